"""A sweep's artifacts (best_config.json, warm_start.json, eval/confusion.json, eval/samples.npz), read
into `SweepData` by `reports.data.load_sweep`.

Anyone who can write the store's artifacts could otherwise make `python -m reports` decompress gigabytes
or recurse until it fails (docs/security.md), so each file is bounded before it is read; one that is
missing or unreadable leaves a note and its field None.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnclf.args import described
from sweeps import spec

if TYPE_CHECKING:
    from reports.data import SweepData

SAMPLE_ARRAYS = ("images", "labels", "preds", "probs", "classes")
WARM_START_TAG = "warm_start.sources"  # on the parent run of a sweep run with --warm-start: the sources, comma-joined
MAX_JSON_BYTES = 16 * 2**20  # best_config.json, warm_start.json, eval/confusion.json
MAX_JSON_DEPTH = 32  # nesting of arrays and objects; the sweeps write at most 5
MAX_SAMPLES = 256  # images in eval/samples.npz (the sweeps write 32)
MAX_SAMPLE_SIDE = 512  # pixels per side (TrainConfig's largest image_size): 256 x 3 x 512 x 512 uint8 = 192 MiB
MAX_CLASSES, MAX_CLASS_CHARS = 1000, 200


def load(c, data: SweepData) -> None:
    """The sweep's artifacts into `data`, through MlflowClient `c`; a note in `data.notes` for each one
    missing or unreadable."""
    run_id = data.parent["run_id"]
    try:
        top = {f.path for f in c.list_artifacts(run_id)}
        evals = {f.path for f in c.list_artifacts(run_id, "eval")} if "eval" in top else set()
    except Exception as e:
        data.notes.append(f"the sweep's artifacts could not be listed ({described(e)})")
        return
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():

        def fetch(path: str, present: set[str]) -> Path | None:
            if path not in present:
                return None
            try:
                return Path(c.download_artifacts(run_id, path, tmp))
            except Exception as e:
                data.notes.append(f"`{path}` could not be downloaded ({described(e)})")
                return None

        if p := fetch("best_config.json", top):
            try:
                best = read_json(p)
                if not isinstance(best, dict):
                    raise ValueError(f"a JSON object expected, not {type(best).__name__}")
                data.best_config = best
            except (OSError, ValueError) as e:
                data.notes.append(f"`best_config.json` is unreadable ({described(e)})")
        sources = data.parent["tags"].get(WARM_START_TAG)
        if p := fetch("warm_start.json", top):
            try:
                data.warm_start = warm_start(read_json(p))
            except (OSError, ValueError, KeyError, TypeError) as e:
                data.notes.append(f"`warm_start.json` is unreadable ({described(e)})")
        elif sources and "warm_start.json" not in top:
            data.notes.append(f"`warm_start.json` is missing: the sweep was warm-started from {sources}")
        if p := fetch("eval/confusion.json", evals):
            try:
                conf = read_json(p)
                matrix = np.asarray(conf["matrix"], dtype=np.int64)
                if matrix.shape != (len(conf["classes"]),) * 2:
                    raise ValueError(f"matrix {matrix.shape} for {len(conf['classes'])} classes")
                data.confusion = {**conf, "matrix": matrix}
            except (OSError, ValueError, KeyError, TypeError) as e:
                data.notes.append(f"`eval/confusion.json` is unreadable ({described(e)})")
        if p := fetch("eval/samples.npz", evals):
            try:
                check_samples(p)  # from the headers, before anything is decompressed
                with np.load(p, allow_pickle=False) as z:  # no pickles from a store others write to
                    data.samples = {k: z[k] for k in SAMPLE_ARRAYS}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                data.notes.append(f"`eval/samples.npz` is unreadable ({described(e)})")


def read_json(path: Path) -> Any:
    """A JSON file from the store, bounded: at most MAX_JSON_BYTES and MAX_JSON_DEPTH levels of nesting.
    ValueError (one line) otherwise; never RecursionError, however deep the file nests."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{size / 2**20:.0f} MiB, more than the {MAX_JSON_BYTES // 2**20} MiB a report reads")
    try:
        doc = json.loads(path.read_bytes())
    except RecursionError:  # json's decoder stops at the interpreter's recursion limit, cleanly
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    todo = [(doc, 1)]  # depth-first, without recursion
    while todo:
        x, depth = todo.pop()
        if isinstance(x, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            todo += [(v, depth + 1) for v in (x.values() if isinstance(x, dict) else x)]
    return doc


def check_samples(path: Path) -> None:
    """eval/samples.npz checked from its arrays' .npy headers, read through zipfile: ValueError (one line)
    unless it holds SAMPLE_ARRAYS of n <= MAX_SAMPLES images (n, 3, S, S) uint8 with S <= MAX_SAMPLE_SIDE,
    integer labels and preds (n,), float probs (n,) and at most MAX_CLASSES class names. A header is a few
    hundred bytes at the start of its member, so a member that would decompress to gigabytes is refused
    after reading those bytes; np.load then reads exactly what the headers say."""
    fmt = np.lib.format
    headers: dict[str, list[tuple[tuple[int, ...], np.dtype]]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if key not in SAMPLE_ARRAYS:
                continue  # never read
            with zf.open(info) as f:
                version = fmt.read_magic(f)  # ValueError for a member that is not .npy (np.load returns its bytes)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"{info.filename}: .npy format {version[0]}.{version[1]} is not read")
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
            headers.setdefault(key, []).append((tuple(shape), dtype))  # a name stored twice: both checked
    missing = [k for k in SAMPLE_ARRAYS if k not in headers]
    if missing:
        raise ValueError(f"no {', '.join(missing)} array")
    images = headers["images"]
    n = images[0][0][0] if images[0][0] else -1
    limit = f"at most {MAX_SAMPLES} images (n, 3, S, S) uint8 with S <= {MAX_SAMPLE_SIDE}"
    for shape, dtype in images:
        ok = len(shape) == 4 and shape[:2] == (n, 3) and shape[2] == shape[3] and dtype == np.uint8
        if not (ok and 0 <= n <= MAX_SAMPLES and 1 <= shape[2] <= MAX_SAMPLE_SIDE):
            raise ValueError(f"images {shape} {dtype}: {limit}")
    kinds = {"labels": "iu", "preds": "iu", "probs": "f"}
    for key, kind in kinds.items():
        for shape, dtype in headers[key]:
            if shape != (n,) or dtype.kind not in kind or dtype.itemsize > 8:
                raise ValueError(f"{key} {shape} {dtype}: expected {n} {'integers' if kind == 'iu' else 'floats'}")
    for shape, dtype in headers["classes"]:
        if len(shape) != 1 or shape[0] > MAX_CLASSES or dtype.kind not in "US" or dtype.itemsize > 4 * MAX_CLASS_CHARS:
            raise ValueError(f"classes {shape} {dtype}: expected at most {MAX_CLASSES} names")


def warm_start(doc: dict) -> dict:
    """warm_start.json checked: `sources` (sweep names), `trials` (each with `sweep`, `number`, `params`,
    `value` (the val/acc the sampler was given; None when not a finite number) and `status`) and `left_out`
    (each with `sweep`, `count` and `why`). KeyError, TypeError or ValueError when it is not so."""
    if not isinstance(doc, dict):
        raise TypeError(f"a JSON object expected, not {type(doc).__name__}")

    def listed(key: str, kind: type = dict) -> list:
        items = doc.get(key) or []
        if not isinstance(items, list) or not all(isinstance(x, kind) for x in items):
            raise TypeError(f"`{key}`: a list of {'objects' if kind is dict else 'names'} expected")
        return items

    trials = []
    for t in listed("trials"):
        params = t.get("params") or {}
        if not isinstance(params, dict):
            raise TypeError(f"trial params: a JSON object expected, not {type(params).__name__}")
        v = t.get("value")
        trials.append(
            {
                "sweep": str(t["sweep"]),
                "number": t.get("number"),
                "params": params,
                "value": float(v) if spec.finite(v) else None,
                "status": str(t.get("status", "completed")),
            }
        )
    left_out = [{"sweep": str(x["sweep"]), "count": int(x["count"]), "why": str(x["why"])} for x in listed("left_out")]
    sources = [str(x) for x in listed("sources", str) or dict.fromkeys(t["sweep"] for t in trials)]
    return {"sources": sources, "trials": trials, "left_out": left_out}


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per artifact download on stderr; a report downloads a handful."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
