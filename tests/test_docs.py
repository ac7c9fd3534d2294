"""Docs that cannot drift silently: each table below is compared with the code it describes.

- docs/internals.md "Private APIs we use": every private or undocumented name of torch, torchvision, Ray,
  Optuna or MLflow that the code uses, found by reading the code (no import), and nothing the code stopped using;
- docs/internals.md "Layers": the rows, in order, are the `layers` contract of sweeps/ in pyproject.toml's
  `[tool.importlinter]`, read when the test runs;
- docs/sweeps.md "The search space" and each script's docstring: the ranges Optuna is asked for (sweeps.spec's
  `Ranges` defaults and the scripts' TaskSpecs, through the searchers' `Space`).
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNALS = ROOT / "docs" / "internals.md"
SCANNED = ("cnnclf", "sweeps", "reports", "benchmarks", "tests")

# --- private APIs ----------------------------------------------------------------------------------------------

LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "optuna")
# Internal packages whose names carry no underscore.
INTERNAL_PACKAGES = ("mlflow.store.db.", "ray.core.generated.")
# MLflow's documented system tags (MLflow Tracking docs, "System Tags"): public, so not in the table.
DOCUMENTED_MLFLOW_TAGS = {
    "mlflow.runName",
    "mlflow.note.content",
    "mlflow.parentRunId",
    "mlflow.user",
    "mlflow.source.type",
    "mlflow.source.name",
    "mlflow.source.git.commit",
    "mlflow.source.git.branch",
    "mlflow.source.git.repoURL",
}
NOT_MLFLOW_NAMES = {"mlflow.db", "mlflow.db.lock"}  # file names of the default store and its lock
ENV_KNOB = re.compile(r"\b(?:RAY|TUNE)_[A-Z0-9_]*[A-Z0-9]\b")
DOTTED = re.compile(r"\b(?:" + "|".join(LIBRARIES) + r")(?:\.(?:\w+|\{\w+\}))+")


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))  # `__version__` is public


def _private(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in LIBRARIES and (any(map(_is_private, parts[1:])) or name.startswith(INTERNAL_PACKAGES))


def _private_attribute(node: ast.Attribute, aliases: dict[str, str]) -> str | None:
    """`torch._dynamo.reset` as a dotted name with its first part's import resolved (`tune._x` -> `ray.tune._x`),
    when an attribute in it is private; None otherwise (what was imported is judged at its import)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases or not any(map(_is_private, parts)):
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes: a name mentioned in prose is not a use."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def names_in(source: str) -> set[str]:
    """The private or undocumented names one Python file uses: imports and attribute chains of the libraries
    with a `_private` part (or in an internal package), such dotted names in strings (`importlib`), `mlflow.*`
    strings other than documented system tags, and Ray/Tune environment variables in strings."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if _private(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names if _private(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Attribute) and (name := _private_attribute(node, aliases)):
            found.add(name)
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # f"ray.autoscaler._private.{kind}": the placeholders as written
            text = "".join(
                v.value if isinstance(v, ast.Constant) else f"{{{ast.unparse(v.value)}}}" for v in node.values
            )
            found |= {m for m in DOTTED.findall(text) if _private(m)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            found |= {m for m in DOTTED.findall(text) if _private(m)}
            found |= set(ENV_KNOB.findall(text))
            if re.fullmatch(r"mlflow(\.\w+)+", text) and text not in DOCUMENTED_MLFLOW_TAGS | NOT_MLFLOW_NAMES:
                found.add(text)
    # `import torch._dynamo` then `torch._dynamo.reset()`: the longer name says it
    return {n for n in found if not any(o.startswith(n + ".") for o in found)}


def used_in_code() -> dict[str, set[str]]:
    """Each private name -> the files (relative paths) that use it."""
    uses: dict[str, set[str]] = defaultdict(set)
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__):
                continue  # this scanner, whose examples are no use
            for name in names_in(path.read_text()):
                uses[name].add(path.relative_to(ROOT).as_posix())
    return uses


def section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str, body: bool = True) -> list[list[str]]:
    """The rows of the first Markdown table in text, as lists of cells: its body, or (body=False) every line."""
    lines = []
    for line in text[text.index("\n|") + 1 :].splitlines():
        if not line.startswith("|"):
            break
        lines.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return lines[2:] if body else lines


def test_names_in_finds_every_kind_of_private_use():
    source = '''
"""Prose that mentions torch._dynamo.reset and RAY_IN_A_DOCSTRING is no use."""
import torch._dynamo
import importlib
from ray import tune
from ray._raylet import GcsClient
from mlflow.store.db.utils import InitialBase
from optuna.samplers import TPESampler
torch._dynamo.reset()
tune._private_thing.call()
importlib.import_module(f"ray.autoscaler._private.{kind}")
tags = {"mlflow.experimentKind": "x", "mlflow.note.content": "y"}
path = "mlflow.db"
env = {"RAY_USAGE_STATS_ENABLED": "0"}
'''
    assert names_in(source) == {
        "torch._dynamo.reset",
        "ray.tune._private_thing.call",
        "ray._raylet.GcsClient",
        "mlflow.store.db.utils.InitialBase",
        "ray.autoscaler._private.{kind}",
        "mlflow.experimentKind",
        "RAY_USAGE_STATS_ENABLED",
    }


def test_the_private_api_table_lists_exactly_what_the_code_uses():
    uses = used_in_code()
    documented: dict[str, str] = {}  # name -> its row's `where` cell
    for where, names, *_ in table_rows(section(INTERNALS, "Private APIs we use")):
        for name in re.findall(r"`([^`]+)`", names):
            if name.split(".")[0] in LIBRARIES or ENV_KNOB.fullmatch(name):
                assert name not in documented, f"{name} is in two rows"
                documented[name] = where
    missing = sorted(set(uses) - set(documented))
    gone = sorted(set(documented) - set(uses))
    assert not missing, f"used in the code but not in docs/internals.md's table: {[(n, uses[n]) for n in missing]}"
    assert not gone, f"in docs/internals.md's table but no longer used by the code: {gone}"
    for name, files in uses.items():
        for file in files:
            assert f"`{file}`" in documented[name], f"{name} is used in {file}; its row names {documented[name]}"


# --- layers ----------------------------------------------------------------------------------------------------


def sweeps_layers_contract() -> list[str]:
    """The `layers` contract of sweeps/ in pyproject.toml, top to bottom, each layer's modules sorted: `a, b`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "layers" and c["containers"] == ["sweeps"]]
    return [", ".join(sorted(m.strip() for m in re.split(r"[|:]", layer))) for layer in contract["layers"]]


def test_the_layer_table_is_the_import_contract():
    contract = sweeps_layers_contract()
    rows = table_rows(section(INTERNALS, "Layers"))
    documented = [
        ", ".join(sorted(re.sub(r"\.py$|/$", "", m) for m in re.findall(r"`([^`]+)`", modules)))
        for _, modules, _ in rows
    ]
    # One row a layer, top to bottom, its modules in the second column, as in pyproject.toml's contract.
    assert documented == contract, "docs/internals.md's layer table is not the import contract"
    assert all(what for *_, what in rows), "a layer without a description"


# --- search ranges ---------------------------------------------------------------------------------------------


class _Recorder:
    """An Optuna trial stand-in that notes what it is asked for and answers with the first choice or the low end."""

    number = 0

    def __init__(self) -> None:
        self.asked: dict[str, tuple] = {}

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("choice", tuple(choices))
        return choices[0]

    def suggest_float(self, name, low, high, log=False):
        self.asked[name] = ("log-uniform" if log else "uniform", low, high)
        return low

    def suggest_int(self, name, low, high):
        self.asked[name] = ("integer", low, high)
        return low


def searched(ranges) -> dict[str, tuple]:
    """What the searchers' define-by-run space asks Optuna for: `name` when every optimizer family is asked the
    same, else `name (its optimizers)` for each family that is asked it (`lr (sgd)`, `amsgrad (adam, adamw)`)."""
    from sweeps.searchers import Space
    from sweeps.spec import OPTIMIZER_FAMILIES

    def ask(fixed: dict) -> dict[str, tuple]:
        trial = _Recorder()
        Space(ranges, fixed, experiment="tests/test_docs.py")(trial)
        return trial.asked

    out = {"optimizer": ask({})["optimizer"]}
    families = {", ".join(members): ask({"optimizer": members[0]}) for members in OPTIMIZER_FAMILIES.values()}
    for name in sorted({n for asked in families.values() for n in asked}):
        each = {family: asked[name] for family, asked in families.items() if name in asked}
        if len(each) == len(families) and len(set(each.values())) == 1:
            out[name] = next(iter(each.values()))
        else:
            out |= {f"{name} ({family})": space for family, space in each.items()}
    return out


def _value(text: str):
    text = text.strip()
    if text in ("false", "true"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the first Markdown table in text."""
    header, *rows = table_rows(text, body=False)
    return header, rows[1:]


def docs_space(cell: str, kind: str) -> tuple:
    """`3 to 8` -> (kind, 3, 8); `4, 16, 32 (4: the seed's)` -> ('choice', (4, 16, 32))."""
    cell = re.sub(r"\s*\(.*\)$", "", cell)
    if kind == "choice":
        return ("choice", tuple(_value(v) for v in cell.split(",")))
    low, high = cell.split(" to ")
    return (kind, _value(low), _value(high))


def docstring_space(doc: str) -> dict[str, tuple]:
    """The 'Search space' block of a script's docstring, keyed as `searched` keys it."""
    block = doc.split("Search space")[1].split("\nFixed unless pinned")[0]
    out = {}
    for line in block.splitlines()[1:]:
        name, rest = line.split(maxsplit=1)
        if m := re.match(r"log-uniform, sgd \[(\S+), (\S+)\], adam/adamw \[(\S+), (\S+)\]$", rest):
            out["lr (sgd)"] = ("log-uniform", _value(m[1]), _value(m[2]))
            out["lr (adam, adamw)"] = ("log-uniform", _value(m[3]), _value(m[4]))
            continue
        if m := re.search(r", (\S+) only$", rest):
            name = f"{name} ({', '.join(m[1].split('/'))})"
        if m := re.match(r"\{([^}]*)\}", rest):
            out[name] = ("choice", tuple(_value(v) for v in m[1].split(",")))
        elif m := re.match(r"(log-uniform|uniform|int) \[(\S+), ([^\]]+)\]", rest):
            out[name] = ("integer" if m[1] == "int" else m[1], _value(m[2]), _value(m[3]))
        else:
            raise AssertionError(f"a line of the search space that this test cannot read: {line!r}")
    return out


@pytest.fixture(scope="module")
def specs():
    from sweeps.catdog import SPEC as CATDOG
    from sweeps.cifar10 import SPEC as CIFAR10

    return {"CIFAR-10": CIFAR10, "Cat/Dog": CATDOG}


def test_the_search_space_table_is_what_the_searchers_ask_for(specs):
    header, rows = table(section(ROOT / "docs" / "sweeps.md", "The search space"))
    assert header[:2] == ["parameter", "distribution"] and set(header[2:]) == set(specs), header
    for task, spec in specs.items():
        column = header.index(task)
        documented = {row[0].replace("`", ""): docs_space(row[column], row[1]) for row in rows}
        assert documented == searched(spec.ranges), f"docs/sweeps.md's search space for {task}"


def test_each_scripts_docstring_states_its_search_space(specs):
    for spec in specs.values():
        assert docstring_space(spec.doc) == searched(spec.ranges), f"sweeps/{spec.task}.py's docstring"
