"""`build_report`: one sweep (or several of one task, side by side) -> report.md, report.html, PNGs, trials.csv."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from reports import analysis as an
from reports import answer, cost, figures, plots
from reports.data import SweepData, list_sweeps, load_sweep, resolve_sweeps
from reports.fmt import duration, pct, value
from reports.render import Block, Bullets, Code, Heading, Image, Page, Para, Table, write
from sweeps.spec import ADAM_ONLY, DOCUMENTED, SEARCH_PARAMS, SGD_ONLY, finite

TOP_TABLE = 10
SWEEP_SETTINGS = ("num_samples", "max_epochs", "scheduler", "grace_period", "seed", "subset", "smoke_test")
SWEEP_SETTINGS += ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "address", "budget_by", "max_trial_minutes")


def build_report(tracking_uri: str, experiment: str, sweeps: list[str] | None, out_dir: Path) -> list[Path]:
    """Write the report of `sweeps` (None: the newest; ["all"]: every sweep) of `experiment` into `out_dir`.

    Returns the files written: report.md first, then report.html, trials.csv and the PNGs.
    Raises ReportError for an unknown or empty experiment, an unknown sweep or an unreachable store.
    """
    out_dir = Path(out_dir)
    names = resolve_sweeps(list_sweeps(tracking_uri, experiment), sweeps, experiment)
    loaded = [load_sweep(tracking_uri, experiment, n) for n in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    compare = len(loaded) > 1
    task = an.task_of(loaded[0])
    page = Page(out_dir)
    if compare:
        title = f"{task}: {len(loaded)} sweeps compared"
        page.blocks.append(Heading(1, title))
        page.blocks.append(Para(_provenance(tracking_uri, experiment)))
        _comparison(loaded, task, page)
    else:
        title = f"{task} sweep {loaded[0].name}"
        page.blocks.append(Heading(1, f"{task} sweep `{loaded[0].name}`"))
        page.blocks.append(Para(_provenance(tracking_uri, experiment)))
    for s in loaded:
        _sweep_section(s, replace(page, prefix=f"{s.name}_" if compare else ""), level=3 if compare else 2)
    csv = out_dir / "trials.csv"
    pd.concat([_trials_frame(s) for s in loaded], ignore_index=True).to_csv(csv, index=False)
    return [*write(page.blocks, title, out_dir), csv, *page.pngs]


def _provenance(tracking_uri: str, experiment: str) -> str:
    return (
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m reports` from MLflow "
        f"`{tracking_uri}`, experiment `{experiment}`. Accuracies are percent; differences are percentage points."
    )


# ---------------------------------------------------------------------------------------------
# Sections.


def _sweep_section(s: SweepData, page: Page, level: int) -> None:
    """One sweep's sections, in the order a reader asks: the answer, what it rests on, then the details.
    Compared sweeps (`page.prefix` set) each open with their own heading, one level above `level`."""
    h, blocks = level, page.blocks
    if page.prefix:
        blocks.append(Heading(h - 1, f"Sweep `{s.name}`"))
    _settings(s, blocks)
    ans = answer.headline(s, blocks, h)
    answer.confirmation(s, ans, blocks, h)
    _top_trials(s, blocks, h)
    cost.prior_section(s, blocks, h + 1)
    _outcomes(s, blocks, h)
    cost.cost_section(s, page, h)
    blocks.append(Heading(h, "Plots"))
    figures.plots_section(s, page, h + 1)
    _reproduce(s, blocks, h)
    if s.notes:
        blocks.append(Heading(h, "Notes"))
        blocks.append(Bullets(s.notes))


def _settings(s: SweepData, blocks: list[Block]) -> None:
    """When the sweep started, with which flags, and whether it was interrupted."""
    settings = [
        f"{k}={s.parent['params'][k]}" for k in SWEEP_SETTINGS if s.parent["params"].get(k) not in (None, "None")
    ]
    interrupted = s.parent["status"] in ("KILLED", "FAILED") or s.parent["tags"].get("status") == "interrupted"
    blocks.append(
        Para(
            f"Sweep `{s.name}`, started {sweep_start(s)}."
            + (f" Settings: {', '.join(settings)}." if settings else "")
            # The sweeps write this report just before closing their parent run, so RUNNING is normal here.
            + (" **The sweep was interrupted**; resumed, it continues the same runs." if interrupted else "")
        )
    )


def _top_trials(s: SweepData, blocks: list[Block], h: int) -> None:
    """The best TOP_TABLE search trials by val/acc, with the hyperparameters that differ between trials."""
    vis = an.visible(s.runs)
    searched = vis[vis["role"] == "trial"]
    blocks.append(Heading(h, f"Top {TOP_TABLE} search trials by val/acc"))
    ranked = an.ranked(s.runs)
    params = an.hyperparams(searched)
    shown = [p for p in params if p in SEARCH_PARAMS or p in an.varying(searched, params)]
    shown = [p for p in shown if p != "epochs"]  # the epochs column shows run/planned
    fixed = [p for p in params if p not in shown]
    if fixed and len(searched):
        first_row = searched.iloc[0]
        blocks.append(
            Para(
                "Same for every search trial: "
                + ", ".join(f"`{p}={value(first_row[p]) or _blank_as(p)}`" for p in fixed)
                + "."
            )
        )
    if ranked.empty:
        blocks.append(Para("No search trial has a val/acc."))
        return
    blocks.append(
        Table(
            ["#", "trial", "status", "val/acc", "test/acc", "epochs", *shown],
            [
                [
                    str(r["rank"]),
                    f"`{r['trial_id']}`",
                    r["outcome"].replace("_", "-"),
                    pct(r["val/acc"]),
                    pct(r["test/acc"]),
                    f"{value(r['epochs_run'])}/{value(r.get('epochs'))}",
                    *(value(r[p]) for p in shown),
                ]
                for _, r in ranked.head(TOP_TABLE).iterrows()
            ],
            right=(0, 3, 4, 5),
        )
    )
    blocks.append(
        Para(
            "Completed trials first, then early-stopped ones; blank `momentum`/`nesterov` for Adam-family "
            "optimizers and blank `amsgrad` for SGD: those settings do not apply. Every run is in `trials.csv`."
        )
    )


def _outcomes(s: SweepData, blocks: list[Block], h: int) -> None:
    """How many runs of each role ended how, and the error of each failed one."""
    blocks.append(Heading(h, "Outcomes"))
    oc = an.outcome_counts(s.runs)
    blocks.append(
        Table(
            ["outcome", *(f"{c} runs" if c != "all" else "all" for c in oc.columns)],
            [[an.OUTCOME_LABELS[o], *(str(v) for v in oc.loc[o])] for o in oc.index],
            right=tuple(range(1, len(oc.columns) + 1)),
        )
    )
    vis = an.visible(s.runs)
    errors = vis[(vis["outcome"] == "error") & vis["error"].notna()] if "error" in vis else vis.iloc[:0]
    if len(errors):
        blocks.append(Bullets([f"`{r['trial_id']}` failed: {r['error']}" for _, r in errors.iterrows()]))


def _reproduce(s: SweepData, blocks: list[Block], h: int) -> None:
    """The command that trains the recommended configuration again, and how close a rerun lands."""
    blocks.append(Heading(h, "Reproduce the recommended configuration"))
    best = an.best(s.runs)
    if best is None:
        blocks.append(Para("Nothing to reproduce."))
        return
    blocks.append(Code(an.command(s, best)))
    gave = f"test/acc {pct(best['test/acc'])}" if finite(best["test/acc"]) else "no test accuracy (stopped early)"
    blocks.append(
        Para(
            f"This trains what search trial `{best['trial_id']}` trained, on the same data (subset, evaluation "
            f"subset, image size and split seed included); that run gave {gave}." + _threads_line(s) + _model_line(s)
        )
    )


def _confirmed(runs: pd.DataFrame) -> str:
    """The recommended configuration's test/acc over its fresh seeds; – when it was not confirmed."""
    a = an.answer(runs)
    return a.confirmed.test.text() if a is not None and a.confirmed is not None else "–"


def _threads_line(s: SweepData) -> str:
    """How exact a rerun is: on the CPU, float sums depend on the thread count the trial had."""
    threads = (s.best_config or {}).get("command_threads")
    if not threads:
        return " On other hardware a rerun rounds differently and lands near, not exactly on, that accuracy."
    return (
        f" It trained on the CPU with {threads} thread(s): with `OMP_NUM_THREADS={threads}` the command gives the "
        "same accuracy to the image; with other thread counts, within about half a point."
    )


def _model_line(s: SweepData) -> str:
    """Which run the saved model (best_model.pt, the logged MLflow model) is, from best_config.json."""
    model = (s.best_config or {}).get("model") or {}
    if not model.get("source"):
        return ""
    line = f" The saved model is {model['source']}"
    if model.get("command") and model.get("run") != (s.best_config or {}).get("trial_id"):
        line += f"; its own command: `{model['command']}`"
    return line + "."


def _blank_as(param: str) -> str:
    return "n/a" if param in SGD_ONLY + ADAM_ONLY else "None"  # not applicable vs TrainConfig's None (e.g. subset: all)


def sweep_start(s: SweepData) -> str:
    t = an.sweep_start(s.runs) if len(s.runs) else s.parent["start"]
    return "?" if pd.isna(t) else t.strftime("%Y-%m-%d %H:%M UTC")


def _comparison(loaded: list[SweepData], task: str, page: Page) -> None:
    """The section "Side by side": one row per sweep, and their best val/acc so far in one plot."""
    blocks = page.blocks
    blocks.append(Heading(2, "Side by side"))
    doc = DOCUMENTED.get(task)
    rows = []
    for s in loaded:
        runs = s.runs
        best, base = an.best(runs), an.baseline(runs)
        searched = an.visible(runs)
        searched = searched[searched["role"] == "trial"]
        first = an.first_beat(runs, doc.test_acc) if doc else None
        p = s.parent["params"]
        rows.append(
            [
                f"`{s.name}`",
                sweep_start(s),
                f"{len(searched)} ({int((searched['outcome'] == 'completed').sum())} completed)",
                p.get("max_epochs", "?"),
                {"None": "auto"}.get(p.get("gpus_per_trial", "?"), p.get("gpus_per_trial", "?")),
                pct(best["val/acc"]) if best is not None else "–",
                pct(best["test/acc"]) if best is not None else "–",
                _confirmed(runs),
                pct(base["test/acc"]) if base is not None else "–",
                duration(an.wall_seconds(s)),
                (answer.beat(first) if first is not None else "not beaten") if doc else "–",
            ]
        )
    header = ["sweep", "started", "search trials", "max_epochs", "gpus_per_trial", "recommended: its search val/acc"]
    header += ["its search test/acc", "its test/acc over fresh seeds", "baseline test/acc (re-measured)", "wall time"]
    header += [f"first beat {pct(doc.test_acc)} (val/acc)" if doc else "first beat documented"]
    blocks.append(Table(header, rows, right=(3, 4, 5, 6, 7, 8, 9)))
    hists = {s.name: an.history(s.runs) for s in loaded}
    hists = {k: v for k, v in hists.items() if v["value"].notna().any()}
    if hists:
        marks = [(f"documented baseline (test) {pct(doc.test_acc)}", doc.test_acc)] if doc else []
        path = plots.save(
            plots.compare_best_so_far(hists, marks, f"{task}: best val/acc so far, per sweep"),
            page.png("compare_best_so_far"),
        )
        page.pngs.append(path)
        blocks.append(Image(path, "Best val/acc so far of each sweep, by trial number and by wall time."))


def _trials_frame(s: SweepData) -> pd.DataFrame:
    """Every run except KILLED orphans: ids, outcome, accuracies, epochs, hyperparameters, times, other metrics."""
    runs = an.visible(s.runs).copy()
    params = an.hyperparams(runs)  # before the columns added below
    ranked = an.ranked(s.runs)
    runs["rank"] = runs["run_id"].map(dict(zip(ranked["run_id"], ranked["rank"], strict=True))).astype("Int64")
    runs["wall_s"] = (runs["end"] - runs["start"]).dt.total_seconds()
    runs.insert(0, "sweep", s.name)
    head = ["sweep", "rank", "trial_id", "role", "outcome", "val/acc", "test/acc", "epochs_run"]
    tail = ["wall_s", "start", "end", "confirm_of", "stopped_by", "error", "mlflow_status", "run_id"]
    metrics = sorted(c for c in runs if "/" in c and c not in head)
    cols = [c for c in head + params + tail + metrics if c in runs]
    cols += [c for c in runs if c not in cols and c not in an.NOT_HYPERPARAMS]
    order = runs["rank"].fillna(10**9).astype(float)
    frame = runs.assign(_order=order).sort_values(["_order", "start"], kind="stable")[cols]
    text = [c for c in frame if pd.api.types.is_object_dtype(frame[c]) or pd.api.types.is_string_dtype(frame[c])]
    return frame.assign(**{c: frame[c].map(csv_cell) for c in text}).rename(columns=csv_cell)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula (OWASP)


def csv_cell(v: object) -> object:
    """A text cell that a spreadsheet would run as a formula, made text with a leading `'`. Tags, params and
    names come from a store others may write; numbers (and text that is a number, such as "-1e-3") stay."""
    if not isinstance(v, str) or not v.startswith(FORMULA_START):
        return v
    try:
        float(v)
        return v
    except ValueError:
        return "'" + v
