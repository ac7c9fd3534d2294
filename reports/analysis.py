"""What the report says about a sweep: the best trial, the baselines, outcomes, confirmations, timings.

The rules are the sweep's own (sweeps/spec.py): `val/acc` chooses (mode max) among search trials
(role=trial) whose val/acc is a measurement, those that ran all their epochs first; the test set only
reports. Runs closed as KILLED (orphaned by an interruption) appear in the outcome counts and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from cnnclf.config import CLASSES, TrainConfig
from reports.data import ADAM_FAMILY, OUTCOMES, SGD_FAMILY, SweepData, parse_param
from sweeps.spec import (
    ADAM_ONLY,
    CATEGORICAL_PARAMS,
    LOG_PARAMS,
    MEASURED,
    METRIC,
    ROLES,
    SGD_ONLY,
    Answer,
    Run,
    confirmation_stats,
    finite,
    ranked_by,
    reproduce_command,
)
from sweeps.spec import answer as spec_answer

NOT_HYPERPARAMS = ("task", "val_fraction", "test_fraction")  # data split settings, identical across a sweep
# Every TrainConfig field but the data split (and the free-form tags), in TrainConfig's own order.
PARAM_ORDER = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in (*NOT_HYPERPARAMS, "tags"))
_LABELS = {
    "early_stopped": "early-stopped (ASHA)",
    "too_slow": "too slow (cost guard)",
    "oom": "failed (out of memory)",
    "error": "failed (error)",
    "interrupted": "interrupted (KILLED)",
    "running": "still running",
}
OUTCOME_LABELS = {o: _LABELS.get(o, o) for o in OUTCOMES}
ALWAYS_COUNTED = (*MEASURED, "too_slow", "diverged", "oom", "error")  # the console's counts: rows even when zero


def task_of(sweep: SweepData) -> str:
    """The task from the trials' `task` param; the experiment name when no trial logged one."""
    if "task" in sweep.runs and sweep.runs["task"].notna().any():
        return str(sweep.runs["task"].dropna().iloc[0])
    return sweep.experiment


def visible(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run except those orphaned by an interruption."""
    return runs[runs["outcome"] != "interrupted"]


def _rank_keys(runs: pd.DataFrame) -> list[tuple | None]:
    """sweeps.spec.ranked_by of each run, in row order (None: not ranked)."""
    return [ranked_by(*r) for r in zip(runs["role"], runs["outcome"], runs[METRIC], strict=True)]


def ranked(runs: pd.DataFrame) -> pd.DataFrame:
    """Search trials with a val/acc, best first: those that ran all epochs, then early-stopped ones."""
    keys = _rank_keys(runs)
    order = sorted((i for i, k in enumerate(keys) if k is not None), key=keys.__getitem__)  # stable: ties by start
    out = runs.iloc[order]
    return out.assign(rank=np.arange(1, len(out) + 1))


def answer(runs: pd.DataFrame) -> Answer | None:
    """The sweep's recommendation and its evidence (sweeps.spec.answer: the rule the sweep itself applies),
    from every run but KILLED orphans."""
    vis = visible(runs)
    records = []
    for r in vis.to_dict("records"):
        more = {"confirm_of": r.get("confirm_of") if isinstance(r.get("confirm_of"), str) else None}
        more["seed"] = int(r["seed"]) if finite(r.get("seed")) else None
        records.append(Run.of(str(r["trial_id"]), str(r["role"]), str(r["outcome"]), r, **more))
    return spec_answer(records)


def best(runs: pd.DataFrame) -> pd.Series | None:
    """The recommended configuration's search trial (see `answer`): confirmed, or the best by val/acc."""
    a = answer(runs)
    if a is None:
        return None
    r = ranked(runs)
    return r[r["trial_id"] == a.trial.trial_id].iloc[0]


def baseline(runs: pd.DataFrame) -> pd.Series | None:
    """The seed baseline re-measured in the sweep (the last one, if the sweep was resumed)."""
    b = visible(runs)
    b = b[b["role"] == "baseline"]
    return None if b.empty else b.iloc[-1]


def outcome_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per outcome (rows) and role (columns), with a total; outcomes nobody had are left out."""
    roles = [r for r in ROLES if (runs["role"] == r).any()] or ["trial"]
    table = pd.DataFrame(
        {role: [int(((runs["role"] == role) & (runs["outcome"] == o)).sum()) for o in OUTCOMES] for role in roles},
        index=list(OUTCOMES),
    )
    table["all"] = table.sum(axis=1)
    keep = [o for o in OUTCOMES if o in ALWAYS_COUNTED or table.at[o, "all"]]
    return table.loc[keep]


def confirmations(runs: pd.DataFrame) -> pd.DataFrame:
    """Per confirmed trial: n finished retrainings with fresh seeds, mean and sample std of test/val acc.

    The statistics are sweeps.spec.confirmation_stats: with one run the std is NaN (undefined), as in the sweep.
    """
    c = visible(runs)
    c = c[c["role"] == "confirm"]
    rows = []
    for of, g in c.groupby(c["confirm_of"].fillna("?"), sort=False):
        ok = g[(g["outcome"] == "completed") & g["test/acc"].map(finite)]
        orig = runs[(runs["trial_id"] == of) & (runs["role"] == "trial")]
        stats = confirmation_stats([float(v) for v in ok["test/acc"]], [float(v) for v in ok[METRIC] if finite(v)])
        rows.append(
            {
                "confirm_of": of,
                **stats,
                "not_finished": len(g) - len(ok),
                "seeds": ", ".join(str(s) for s in ok["seed"]) if "seed" in ok else "",
                "orig_val": orig[METRIC].iloc[0] if len(orig) else math.nan,
                "orig_test": orig["test/acc"].iloc[0] if len(orig) else math.nan,
            }
        )
    out = pd.DataFrame(rows)
    return out.sort_values("test_mean", ascending=False, na_position="last") if len(out) else out


def sweep_start(runs: pd.DataFrame) -> pd.Timestamp:
    """The first trial's start (the baseline's included): where the sweep's wall clock starts."""
    return runs["start"].min()


def wall_seconds(sweep: SweepData) -> float:
    """First trial start to last run end (confirmations included); the parent's times as a fallback."""
    runs = sweep.runs
    start = sweep_start(runs) if len(runs) else sweep.parent["start"]
    end = runs["end"].max() if len(runs) and runs["end"].notna().any() else sweep.parent["end"]
    if pd.isna(start) or pd.isna(end):
        return math.nan
    return (end - start).total_seconds()


def history(runs: pd.DataFrame) -> pd.DataFrame:
    """Search trials in start order with their val/acc and the best so far, by number and by end time.

    Only trials that reported a val/acc as a measurement count (completed, early-stopped);
    elapsed_s is seconds from the sweep's start to the trial's end (when its value was known).
    """
    start = sweep_start(runs)
    t = visible(runs)
    t = t[t["role"] == "trial"].sort_values("start", kind="stable").copy()
    t["number"] = np.arange(1, len(t) + 1)
    t["value"] = [v if o in MEASURED and finite(v) else math.nan for v, o in zip(t[METRIC], t["outcome"], strict=True)]
    t["best_by_number"] = t["value"].cummax().ffill()  # cummax is NaN at the NaN trials themselves
    t["elapsed_s"] = (t["end"] - start).dt.total_seconds()
    by_time = t[t["value"].notna() & t["elapsed_s"].notna()].sort_values("elapsed_s", kind="stable")
    t["best_by_time"] = by_time["value"].cummax().reindex(t.index)  # NaN where no value: not drawn
    return t


def first_beat(runs: pd.DataFrame, threshold: float) -> pd.Series | None:
    """The first search trial, by end time, whose final val/acc exceeds `threshold`; None if none did."""
    h = history(runs)
    h = h[(h["value"] > threshold) & h["elapsed_s"].notna()].sort_values("elapsed_s", kind="stable")
    return None if h.empty else h.iloc[0]


def varying(runs: pd.DataFrame, names: list[str] | tuple[str, ...]) -> list[str]:
    """Of `names`, the params that take more than one value (a blank counts as a value) across runs."""
    return [n for n in names if n in runs and len({"" if blank(v) else str(v) for v in runs[n]}) > 1]


def blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def hyperparams(runs: pd.DataFrame) -> list[str]:
    """Every logged TrainConfig field except the data split, in a readable order."""
    known = [p for p in PARAM_ORDER if p in runs]
    metric_like = {"run_id", "trial_id", "role", "outcome", "mlflow_status", "confirm_of", "stopped_by", "error"}
    metric_like |= {"start", "end", "epochs_run"}
    rest = sorted(
        c for c in runs if "/" not in c and c not in metric_like and c not in known and c not in NOT_HYPERPARAMS
    )
    return known + rest


def command(sweep: SweepData, row: pd.Series) -> str:
    """`python -m cnnclf train ...` for a trial: best_config.json's when it is that trial's, else rebuilt
    from the run's logged params through TrainConfig.cli_args (as the sweep writes it)."""
    bc = sweep.best_config or {}
    if bc.get("trial_id") == row["trial_id"] and bc.get("command"):
        return str(bc["command"])
    try:
        cfg = logged_config(sweep, row["run_id"])
    except (ValueError, TypeError) as e:  # ConfigError included: never a command that trains something else
        return f"# trial {row['trial_id']}: its logged params do not form a TrainConfig ({' '.join(str(e).split())})"
    return reproduce_command(cfg)


def logged_config(sweep: SweepData, run_id: str) -> TrainConfig:
    """The TrainConfig a run logged (every field but tags, as a string param); ValueError if it logged none."""
    params = {k: parse_param(v) for k, v in sweep.raw_params.get(run_id, {}).items()}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"tags"}
    params.setdefault("task", task_of(sweep))
    params.setdefault("compile", "auto")  # stores written before the setting existed trained with today's auto
    params.setdefault("precision", "auto")  # ... and before this one, bf16 on CUDA and fp32 on the CPU
    for k in ("momentum", "nesterov", "amsgrad", "eval_subset", "split_seed"):
        # not logged where the optimizer ignores it (sweeps.spec.applies), nor by stores before the field
        params.setdefault(k, getattr(TrainConfig(), k))
    if missing := sorted(fields - set(params)):
        raise ValueError(f"no param {', '.join(missing)}")
    return TrainConfig.from_dict({k: v for k, v in params.items() if k in fields})


def class_names(sweep: SweepData, runs: pd.DataFrame) -> list[str]:
    """Class names in the task's order, from the per-class metrics that were logged."""
    logged = [c.removeprefix("test/acc/") for c in runs if c.startswith("test/acc/")]
    order = list(CLASSES.get(task_of(sweep), ()))
    if sweep.confusion:
        order = [str(c) for c in sweep.confusion["classes"]]
    return [c for c in order if c in logged] + sorted(c for c in logged if c not in order)


# ---------------------------------------------------------------------------------------------
# Hyperparameter importance (Optuna's fANOVA over the sweep's own trials).

MIN_TRIALS = 10  # fANOVA on fewer trials ranks noise (a sentence in the report says so instead)
FAMILIES = {  # group name -> (optimizers, the params only that family has)
    "SGD trials": (SGD_FAMILY, SGD_ONLY),
    "Adam/AdamW trials": (ADAM_FAMILY, ADAM_ONLY),
}


def importance_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """Search trials Optuna saw as COMPLETE: those ranked (completed or early-stopped, a finite val/acc), by start."""
    return runs.iloc[[i for i, k in enumerate(_rank_keys(runs)) if k is not None]]


def importances(runs: pd.DataFrame) -> tuple[dict[str, dict[str, float]], list[str]]:
    """fANOVA importance of each hyperparameter for val/acc, per group of trials, and notes on what was skipped.

    The search space is conditional (momentum only for SGD, amsgrad only for Adam/AdamW), and
    Optuna's evaluators need one distribution per param across a study; so one study holds every
    trial with the params all trials share, and one per optimizer family adds that family's own.
    """
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = importance_trials(runs)
    conditional = {p for _, extra in FAMILIES.values() for p in extra}
    shared = [p for p in hyperparams(trials) if p not in conditional]
    groups = {"all search trials": (trials, shared)}
    if "optimizer" in trials:
        for name, (opts, extra) in FAMILIES.items():
            g = trials[trials["optimizer"].isin(opts)]
            if len(g) and len(g) < len(trials):  # the family's own study adds something only with other trials around
                groups[name] = (g, shared + list(extra))
            elif len(g):
                groups["all search trials"] = (g, shared + list(extra))
    out: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name, (g, names) in groups.items():
        params = [p for p in names if p in g and g[p].notna().all() and g[p].astype(str).nunique() > 1]
        if len(g) < MIN_TRIALS:
            notes.append(f"{name}: {len(g)} finished trial(s), fewer than {MIN_TRIALS}; importance skipped")
            continue
        if not params:
            notes.append(f"{name}: no hyperparameter varied; importance skipped")
            continue
        dists = {p: _distribution(p, [_native(v) for v in g[p]]) for p in params}
        study = optuna.create_study(direction="maximize")
        for _, r in g.iterrows():
            study.add_trial(
                optuna.trial.create_trial(
                    params={p: _native(r[p]) for p in params}, distributions=dists, value=float(r[METRIC])
                )
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
                )
        except Exception as e:  # e.g. all values equal
            notes.append(f"{name}: importance failed ({type(e).__name__}: {str(e)[:120]})")
            continue
        out[f"{name} (n={len(g)})"] = {k: float(v) for k, v in imp.items()}
    return out, notes


def _native(v):
    return v.item() if isinstance(v, np.generic) else v


def _distribution(name: str, values: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numeric = all(finite(v) for v in values)
    if not numeric or name in CATEGORICAL_PARAMS:
        return CategoricalDistribution(sorted(set(values), key=lambda v: (str(type(v)), v)))
    lo, hi = min(values), max(values)
    if all(isinstance(v, int) for v in values):
        return IntDistribution(int(lo), int(hi))
    return FloatDistribution(float(lo), float(hi), log=name in LOG_PARAMS and lo > 0)
