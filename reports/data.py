"""MLflow -> pandas: a sweep's parent run, one row per trial run, and the parent's artifacts (reports/artifacts.py).

The contract is what `sweeps/callbacks.py` writes (docs/tracking.md): one parent run per sweep
(tags `role=sweep`, `sweep=<name>`; the sweep's flags as `sweep.*` params), one nested child run
per trial (tags `sweep`, `trial_id`, `role`, `status`; every TrainConfig field as a string param;
per-epoch metrics with `step=epoch`, final `test/*` metrics). Stores written before the names were
settled read the same (OLD_METRICS, DROPPED_METRICS, `sweep_settings`). Reads go through
`MlflowClient` with an explicit tracking URI rather than `mlflow.search_runs`, which reads a
process-wide URI (and exports it to the environment): the sweep scripts call the report in-process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cnnclf.args import UsageError, described
from cnnclf.config import name_error
from reports import artifacts
from sweeps import spec, store
from sweeps.spec import ADAM_ONLY, METRIC_PREFIXES, SGD_ONLY, SWEEP_PARAM_PREFIX

# A trial's outcome: the sweep's own (its `status` tag), plus two that only the MLflow run state tells:
# `interrupted` (KILLED: orphaned by an interruption) and `running` (a sweep still in progress).
OUTCOMES = (*spec.OUTCOMES, "interrupted", "running")
SGD_FAMILY, ADAM_FAMILY = spec.OPTIMIZER_FAMILIES["sgd"], spec.OPTIMIZER_FAMILIES["adam"]
# Older stores (docs/tracking.md, "Older stores") logged the learning rate as `lr`, beside the `lr` param:
# read as today's `train/lr`. They also logged bookkeeping as metrics: `epoch` (the step; it still gives
# their epoch count) and `diverged` (the `status` tag says it): both left out.
OLD_METRICS = {"lr": "train/lr"}
DROPPED_METRICS = ("diverged", "epoch")


class ReportError(UsageError):
    """Unusable input: unknown experiment or sweep, an experiment without sweeps, an unreachable store."""


@dataclass
class SweepData:
    """Everything one sweep left in MLflow; `runs` holds every child run, KILLED ones included."""

    tracking_uri: str
    experiment: str
    name: str
    parent: dict  # run_id, start, end, status, params (the sweep's flags, see `sweep_settings`), metrics, tags
    runs: pd.DataFrame  # one row per child run; see `_run_row` for the columns
    raw_params: dict[str, dict[str, str]]  # run_id -> params exactly as logged (for the command line)
    best_config: dict | None = None  # best_config.json
    confusion: dict | None = None  # eval/confusion.json: trial_id, classes, matrix (rows true, cols pred)
    samples: dict[str, np.ndarray] | None = None  # eval/samples.npz
    warm_start: dict | None = None  # warm_start.json: sources, trials, left_out (see `artifacts.warm_start`)
    notes: list[str] = field(default_factory=list)  # why an artifact is missing or unreadable


def check_store(tracking_uri: str) -> None:
    """Fail fast on a store that cannot be read; never create an empty SQLite file by reading one."""
    try:
        store.check(tracking_uri, write=False)
    except store.StoreError as e:
        raise ReportError(f"--tracking-uri: {e}") from None


def client(tracking_uri: str):
    """An MlflowClient for a store that exists (checked on every call: cheap; the client is cached)."""
    check_store(tracking_uri)
    return _client(tracking_uri)


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, experiment: str, tracking_uri: str) -> str | None:
    """The id of an active experiment, None when there is none by that name."""
    try:
        exp = c.get_experiment_by_name(experiment)
    except Exception as e:
        raise ReportError(f"--tracking-uri: cannot read {tracking_uri}: {described(e)}") from None
    if exp is None or exp.lifecycle_stage != "active":
        return None
    return exp.experiment_id


def _search(c, exp_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def list_sweeps(tracking_uri: str, experiment: str, refused: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """The experiment's sweeps (parent runs), oldest first: columns sweep, run_id, start, end, status.

    A sweep name read back from the store is checked as `--name` is (`cnnclf.config.name_error`): the
    report writes files named after it, so a name that is a path (`../x`, written by an older version or
    another tool) is left out; (name, why) of each goes to `refused`."""
    c = client(tracking_uri)
    exp_id = experiment_id(c, experiment, tracking_uri)
    if exp_id is None:
        raise ReportError(f"--experiment: no experiment {experiment!r} in {tracking_uri}")
    rows = [
        {
            "sweep": r.data.tags.get("sweep", r.info.run_name),
            "run_id": r.info.run_id,
            "start": _time(r.info.start_time),
            "end": _time(r.info.end_time),
            "status": r.info.status,
        }
        for r in _search(c, exp_id, "tags.role = 'sweep'")
    ]
    bad = {r["sweep"]: why for r in rows if (why := name_error(r["sweep"] if isinstance(r["sweep"], str) else ""))}
    if refused is not None:
        refused += [(str(n), why) for n, why in bad.items()]
    rows = [r for r in rows if r["sweep"] not in bad]
    df = pd.DataFrame(rows, columns=["sweep", "run_id", "start", "end", "status"])
    # A resumed sweep reuses its parent run, so one row per name; keep the newest if names repeat.
    return df.sort_values("start").drop_duplicates("sweep", keep="last").reset_index(drop=True)


def resolve_sweeps(known: pd.DataFrame, requested: list[str] | None, experiment: str) -> list[str]:
    """Sweep names to report: None -> the newest; ["all"] -> every one, oldest first; else as named."""
    names = list(known["sweep"])
    if not names:
        raise ReportError(f"--experiment: experiment {experiment!r} has no sweeps")
    if not requested:
        return [names[-1]]
    if "all" in requested:
        return names
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise ReportError(
            f"--sweep: no sweep {', '.join(map(repr, unknown))} in experiment {experiment!r} "
            f"(known: {', '.join(names[-5:])}{', ...' if len(names) > 5 else ''})"
        )
    return list(dict.fromkeys(requested))


def load_sweep(tracking_uri: str, experiment: str, name: str) -> SweepData:
    c = client(tracking_uri)
    exp_id = experiment_id(c, experiment, tracking_uri)
    if exp_id is None:
        raise ReportError(f"--experiment: no experiment {experiment!r} in {tracking_uri}")
    found = _search(c, exp_id, f"tags.sweep = '{_quote(name)}'")
    parents = sorted((r for r in found if r.data.tags.get("role") == "sweep"), key=lambda r: r.info.start_time or 0)
    if not parents:
        raise ReportError(f"--sweep: no sweep {name!r} in experiment {experiment!r}")
    p = parents[-1]
    parent = {
        "run_id": p.info.run_id,
        "start": _time(p.info.start_time),
        "end": _time(p.info.end_time),
        "status": p.info.status,
        "params": sweep_settings(p.data.params),
        "metrics": dict(p.data.metrics),
        "tags": dict(p.data.tags),
    }
    children = [r for r in found if r.data.tags.get("role") != "sweep"]
    runs = pd.DataFrame([_run_row(r) for r in children])
    if runs.empty:
        runs = pd.DataFrame(columns=["run_id", "trial_id", "role", "outcome", "mlflow_status", "start", "end"])
    for col in ("val/acc", "test/acc", "epochs_run", "confirm_of", "error", "seed"):
        if col not in runs:
            runs[col] = np.nan if col in ("val/acc", "test/acc", "epochs_run") else None
    for col in ("start", "end"):
        runs[col] = pd.to_datetime(runs[col], utc=True)  # datetime64 even when empty or all NaT
    runs = runs.sort_values("start", kind="stable").reset_index(drop=True)
    raw = {r.info.run_id: dict(r.data.params) for r in children}
    _infer_confirm_of(runs, raw)
    data = SweepData(
        tracking_uri=tracking_uri,
        experiment=experiment,
        name=name,
        parent=parent,
        runs=runs,
        raw_params=raw,
    )
    artifacts.load(c, data)
    return data


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.Series:
    """One metric of one run per step (epoch), the last value logged for each step."""
    hist = client(tracking_uri).get_metric_history(run_id, key)
    s = pd.Series({int(m.step): float(m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))})
    return s.sort_index()


# ---------------------------------------------------------------------------------------------


def _run_row(r) -> dict[str, Any]:
    tags, m = r.data.tags, r.data.metrics
    params = {k: parse_param(v) for k, v in r.data.params.items()}
    opt = params.get("optimizer")
    for names, family in ((SGD_ONLY, SGD_FAMILY), (ADAM_ONLY, ADAM_FAMILY)):
        for k in names:  # blank where the optimizer ignores it: the searcher never chose it there
            if k in params and opt not in family:
                params[k] = None
    row: dict[str, Any] = {
        "run_id": r.info.run_id,
        "trial_id": tags.get("trial_id", r.info.run_id[:8]),
        "role": tags.get("role", "trial"),
        "outcome": outcome(tags.get("status"), r.info.status),
        "mlflow_status": r.info.status,
        "confirm_of": tags.get("confirm_of"),
        "stopped_by": tags.get("stopped_by"),
        "error": tags.get("error"),
        "start": _time(r.info.start_time),
        "end": _time(r.info.end_time),
        "epochs_run": epochs_run(r.data),
    }
    for k, v in m.items():
        if k in DROPPED_METRICS or (k in OLD_METRICS and OLD_METRICS[k] in m):
            continue
        row[OLD_METRICS.get(k, k)] = v
    row.update(params)
    return row


def epochs_run(data) -> float:
    """The epochs a run logged: the highest step of its per-epoch metrics (MLflow keeps, per key, the
    value of the highest step), or an older store's `epoch` metric (a run an older sweep began and this
    one resumed has both). NaN when it logged none."""
    steps = [m.step for m in data.to_proto().metrics if m.key.startswith(METRIC_PREFIXES)]
    steps += [data.metrics["epoch"]] if "epoch" in data.metrics else []
    return float(max(steps)) if steps else np.nan


def sweep_settings(params: dict[str, str]) -> dict[str, str]:
    """The sweep's flags from its parent run's params, by their own names (`num_samples`, not
    `sweep.num_samples`). An older store logged them unprefixed, beside the best trial's `best/*`
    params (left out: best_config.json holds the best configuration)."""
    prefixed = {k.removeprefix(SWEEP_PARAM_PREFIX): v for k, v in params.items() if k.startswith(SWEEP_PARAM_PREFIX)}
    if prefixed:
        return prefixed
    return {k: v for k, v in params.items() if not k.startswith("best/")}


def _infer_confirm_of(runs: pd.DataFrame, raw: dict[str, dict[str, str]]) -> None:
    """Fill a confirmation run's missing `confirm_of` tag: the search trial with the same params but the seed."""
    todo = runs.index[(runs["role"] == "confirm") & runs["confirm_of"].isna()]
    if not len(todo):
        return

    def key(run_id: str) -> tuple:
        return tuple(sorted((k, v) for k, v in raw.get(run_id, {}).items() if k not in ("seed", "split_seed")))

    trials = runs[runs["role"] == "trial"].sort_values("start", kind="stable")
    originals: dict[tuple, str] = {}
    for run_id, trial_id in zip(trials["run_id"], trials["trial_id"], strict=True):
        originals.setdefault(key(run_id), trial_id)  # a config tried twice: the first trial
    for i in todo:
        runs.at[i, "confirm_of"] = originals.get(key(runs.at[i, "run_id"]))


def outcome(status_tag: str | None, mlflow_status: str) -> str:
    """The trial's outcome: the `status` tag, or what the MLflow run status implies when it is absent."""
    if mlflow_status == "KILLED":
        return "interrupted"  # orphaned by an interruption, whatever the tag says
    if status_tag in OUTCOMES:
        return status_tag
    return {"FINISHED": "completed", "FAILED": "error", "RUNNING": "running", "SCHEDULED": "running"}.get(
        mlflow_status, "error"
    )


def parse_param(s: str) -> Any:
    """A param logged as `str(value)` back to bool, int, float, None or str."""
    if s == "None":
        return None
    if s in ("True", "False"):
        return s == "True"
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def _time(ms: int | None) -> pd.Timestamp:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else pd.NaT


def _quote(s: str) -> str:
    return s.replace("'", "\\'")
