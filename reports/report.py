"""`build_report`: one sweep (or several of one task, side by side) -> report.md, report.html, PNGs, trials.csv."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from reports import analysis as an
from reports import cost, plots
from reports.data import SweepData, list_sweeps, load_sweep, metric_history, resolve_sweeps
from reports.fmt import duration, mean_std, pct, pts, value
from reports.render import Block, Bullets, Code, Heading, Image, Para, Table, write
from sweeps.spec import ADAM_ONLY, DOCUMENTED, METRIC, ROLES, SEARCH_PARAMS, SGD_ONLY, Documented, finite

TOP_TABLE = 10
TOP_CURVES = 5
CONFIRM_HEADER = ("confirmed trial", "its val/acc", "its test/acc", "n", "test/acc mean ± std", "val/acc mean ± std")
CONFIRM_HEADER += ("seeds", "not finished")
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
    blocks: list[Block] = []
    pngs: list[Path] = []
    if compare:
        title = f"{task}: {len(loaded)} sweeps compared"
        blocks.append(Heading(1, title))
        blocks.append(Para(_provenance(tracking_uri, experiment)))
        _comparison(loaded, task, out_dir, blocks, pngs)
    else:
        title = f"{task} sweep {loaded[0].name}"
        blocks.append(Heading(1, f"{task} sweep `{loaded[0].name}`"))
        blocks.append(Para(_provenance(tracking_uri, experiment)))
    for s in loaded:
        _sweep_section(s, out_dir, blocks, pngs, level=3 if compare else 2, prefix=f"{s.name}_" if compare else "")
    csv = out_dir / "trials.csv"
    pd.concat([_trials_frame(s) for s in loaded], ignore_index=True).to_csv(csv, index=False)
    return [*write(blocks, title, out_dir), csv, *pngs]


def _provenance(tracking_uri: str, experiment: str) -> str:
    return (
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m reports` from MLflow "
        f"`{tracking_uri}`, experiment `{experiment}`. Accuracies are percent; differences are percentage points."
    )


# ---------------------------------------------------------------------------------------------
# Sections.


def _sweep_section(s: SweepData, out_dir: Path, blocks: list[Block], pngs: list[Path], level: int, prefix: str):
    h = level
    runs = s.runs
    vis = an.visible(runs)
    task = an.task_of(s)
    if prefix:
        blocks.append(Heading(h - 1, f"Sweep `{s.name}`"))
    settings = [
        f"{k}={s.parent['params'][k]}" for k in SWEEP_SETTINGS if s.parent["params"].get(k) not in (None, "None")
    ]
    started = sweep_start(s)
    interrupted = s.parent["status"] in ("KILLED", "FAILED") or s.parent["tags"].get("status") == "interrupted"
    blocks.append(
        Para(
            f"Sweep `{s.name}`, started {started}."
            + (f" Settings: {', '.join(settings)}." if settings else "")
            # The sweeps write this report just before closing their parent run, so RUNNING is normal here.
            + (" **The sweep was interrupted**; resumed, it continues the same runs." if interrupted else "")
        )
    )

    # --- 1. headline
    blocks.append(Heading(h, "Headline"))
    best = an.best(runs)
    base = an.baseline(runs)
    doc = DOCUMENTED.get(task)
    searched = vis[vis["role"] == "trial"]
    n_full = int((searched["outcome"] == "completed").sum())
    if best is None:
        blocks.append(Para("No search trial finished with a val/acc, so there is no best configuration to report."))
    else:
        if best["outcome"] == "completed":
            why = f"highest final val/acc among the {n_full} search trials that ran all their epochs"
        else:
            why = "no search trial ran all its epochs: the best early-stopped trial, which has no test accuracy"
        blocks.append(
            Para(
                f"**Best configuration** ({why}; the test set chose nothing): trial `{best['trial_id']}`, "
                f"val/acc **{pct(best['val/acc'])}**, test/acc **{pct(best['test/acc'])}**."
            )
        )
        hp = [f"{k}={value(best[k])}" for k in (*SEARCH_PARAMS, "epochs") if k in best and value(best[k]) != ""]
        blocks.append(Para("Its hyperparameters: " + ", ".join(f"`{x}`" for x in hp) + "."))
        if confirmed := _confirmed(runs, best):
            blocks.append(Para(f"Retrained with fresh seeds (see Confirmation): test/acc {confirmed}."))
        rows = []
        if doc is not None:
            first = an.first_beat(runs, doc.test_acc)
            rows.append(
                [
                    f"documented: {doc.what}",
                    pct(doc.test_acc),
                    "–",
                    pts(best["test/acc"] - doc.test_acc),
                    _beat(first),
                ]
            )
        if base is not None:
            first = an.first_beat(runs, base["val/acc"]) if finite(base["val/acc"]) else None
            rows.append(
                [
                    f"re-measured in this sweep: trial `{base['trial_id']}` ({base['outcome']}, "
                    f"epochs {value(base.get('epochs_run'))}/{value(base.get('epochs'))})",
                    pct(base["test/acc"]),
                    pct(base["val/acc"]),
                    pts(best["test/acc"] - base["test/acc"]),
                    _beat(first) if finite(base["val/acc"]) else "– (the baseline has no val/acc)",
                ]
            )
        if rows:
            blocks.append(
                Table(
                    ["baseline", "test/acc", "val/acc", "best − baseline (test/acc)", "first beaten after"],
                    rows,
                    right=(1, 2, 3),
                )
            )
            blocks.append(Para(_budget_line(s)))
            blocks.append(
                Para(
                    "“First beaten after”: wall time from the sweep's first trial start to the end of the first "
                    "search trial (by end time) whose final **val/acc** exceeds the baseline: the documented "
                    "figure is a test accuracy, compared with val/acc because the test set chooses nothing; the "
                    "re-measured baseline is compared val/acc to val/acc."
                )
            )
        if base is None:
            blocks.append(Para("No baseline run (role=baseline) in this sweep (`--no-baseline`, or it was lost)."))
    wall = an.wall_seconds(s)
    counts = {r: int((vis["role"] == r).sum()) for r in ROLES}
    line = (
        f"Sweep wall time: **{duration(wall)}** (first trial start to last run end) for {counts['trial']} search "
        f"trials, {counts['baseline']} baseline and {counts['confirm']} confirmation runs."
    )
    if doc is not None and doc.hours:
        line += f" The documented seed trained for {doc.hours:g} hours."
    blocks.append(Para(line))

    # --- 2. confirmation
    blocks.append(Heading(h, "Confirmation with fresh seeds"))
    conf = an.confirmations(runs)
    if conf.empty:
        blocks.append(
            Para("No confirmation runs (role=confirm) in this sweep: `--confirm K` retrains the top K with new seeds.")
        )
    else:
        blocks.append(
            Table(
                [*CONFIRM_HEADER],
                [
                    [
                        f"`{r.confirm_of}`",
                        pct(r.orig_val),
                        pct(r.orig_test),
                        str(r.n),
                        mean_std(r.test_mean, r.test_std, r.n),
                        mean_std(r.val_mean, r.val_std, r.n),
                        r.seeds,
                        str(r.not_finished),
                    ]
                    for r in conf.itertuples()
                ],
                right=(1, 2, 3, 4, 5, 7),
            )
        )
        blocks.append(
            Para(
                "Mean ± sample standard deviation (n − 1) in percentage points over the n confirmation runs that "
                "completed; the original trial is not among them."
            )
        )

    # --- 3. tables
    blocks.append(Heading(h, f"Top {TOP_TABLE} search trials by val/acc"))
    ranked = an.ranked(runs)
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
    else:
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
    cost.prior_section(s, blocks, h + 1)
    blocks.append(Heading(h, "Outcomes"))
    oc = an.outcome_counts(runs)
    blocks.append(
        Table(
            ["outcome", *(f"{c} runs" if c != "all" else "all" for c in oc.columns)],
            [[an.OUTCOME_LABELS[o], *(str(v) for v in oc.loc[o])] for o in oc.index],
            right=tuple(range(1, len(oc.columns) + 1)),
        )
    )
    errors = vis[(vis["outcome"] == "error") & vis["error"].notna()] if "error" in vis else vis.iloc[:0]
    if len(errors):
        blocks.append(Bullets([f"`{r['trial_id']}` failed: {r['error']}" for _, r in errors.iterrows()]))

    cost.cost_section(s, out_dir, prefix, blocks, pngs, h)

    # --- 4. plots
    blocks.append(Heading(h, "Plots"))
    _plots(s, task, out_dir, prefix, blocks, pngs, h + 1)

    # --- 5. reproduction
    blocks.append(Heading(h, "Reproduce the best configuration"))
    if best is None:
        blocks.append(Para("Nothing to reproduce."))
    else:
        blocks.append(Code(an.command(s, best)))
    if s.notes:
        blocks.append(Heading(h, "Notes"))
        blocks.append(Bullets(s.notes))


def _confirmed(runs: pd.DataFrame, best: pd.Series | None) -> str:
    """`mean ± std (n=k)` of the best trial's confirmation runs; empty when it has none."""
    conf = an.confirmations(runs)
    if best is None or conf.empty:
        return ""
    row = conf[conf["confirm_of"] == best["trial_id"]]
    if row.empty or not row.iloc[0]["n"]:
        return ""
    r = row.iloc[0]
    return f"{mean_std(r['test_mean'], r['test_std'], r['n'])} (n={r['n']})"


def _blank_as(param: str) -> str:
    return "n/a" if param in SGD_ONLY + ADAM_ONLY else "None"  # not applicable vs TrainConfig's None (e.g. subset: all)


def _budget_line(s: SweepData) -> str:
    """Which budget mode ran: what ASHA's rungs counted, and the cost guard's limit (sweeps/budget.py)."""
    text = s.parent["tags"].get("budget")
    if text:
        return f"**Budget**: {text.removeprefix('budget ')}."
    return "**Budget**: by epochs (ASHA's rungs counted epochs; a sweep from before time budgets, or run with FIFO)."


def _beat(first: pd.Series | None) -> str:
    if first is None:
        return "not beaten"
    return f"{duration(first['elapsed_s'])} (trial `{first['trial_id']}`, val/acc {pct(first['value'])})"


def sweep_start(s: SweepData) -> str:
    t = an.sweep_start(s.runs) if len(s.runs) else s.parent["start"]
    return "?" if pd.isna(t) else t.strftime("%Y-%m-%d %H:%M UTC")


def _plots(s: SweepData, task: str, out_dir: Path, prefix: str, blocks: list[Block], pngs: list[Path], h: int):
    runs = s.runs
    best = an.best(runs)
    base = an.baseline(runs)
    doc = DOCUMENTED.get(task)

    def add(title: str, fig, name: str, caption: str) -> None:
        path = plots.save(fig, out_dir / f"{prefix}{name}.png")
        pngs.append(path)
        blocks.append(Heading(h, title))
        blocks.append(Image(path, caption))

    def skip(title: str, why: str) -> None:
        blocks.append(Heading(h, title))
        blocks.append(Para(f"Not drawn: {why}."))

    lines = _baseline_marks(doc, base)
    hist = an.history(runs)
    if hist["value"].notna().any():
        add(
            "Best val/acc so far",
            plots.best_so_far(hist, lines, f"{s.name}: best val/acc so far"),
            "best_so_far",
            "Final val/acc of each search trial and the best so far, by trial number and by wall time; red lines "
            "are the baselines.",
        )
    else:
        skip("Best val/acc so far", "no search trial reported a val/acc")

    ranked = an.ranked(runs).head(TOP_CURVES)
    if len(ranked):
        curves = {
            f"#{r['rank']} {r['trial_id']} ({pct(r['val/acc'])})": metric_history(s.tracking_uri, r.run_id, "val/acc")
            for _, r in ranked.iterrows()
        }
        base_curve = None
        if base is not None:
            bc = metric_history(s.tracking_uri, base["run_id"], "val/acc")
            base_curve = (f"baseline {base['trial_id']}", bc) if len(bc) else None
        add(
            f"Learning curves of the top {len(ranked)}",
            plots.learning_curves(curves, base_curve),
            "learning_curves",
            f"val/acc per epoch of the top {len(ranked)} search trials; the baseline dashed.",
        )
    else:
        skip("Learning curves", "no search trial reported a val/acc")

    trials = an.importance_trials(runs)
    params = [p for p in SEARCH_PARAMS if p in trials and trials[p].notna().any()]
    params += [p for p in an.varying(trials, an.hyperparams(trials)) if p not in params]
    params.sort(key=lambda p: an.PARAM_ORDER.index(p) if p in an.PARAM_ORDER else len(an.PARAM_ORDER))
    if len(trials) >= 2 and params:
        add(
            "Parallel coordinates",
            plots.parallel_coordinates(trials, params, METRIC, an.LOG_PARAMS),
            "parallel_coordinates",
            "One line per completed or early-stopped search trial, coloured by its final val/acc (the best "
            "thickest); lr and weight_decay on log axes; n/a where the optimizer has no such setting.",
        )
    else:
        skip("Parallel coordinates", f"{len(trials)} search trial(s) with a val/acc, fewer than 2")

    groups, notes = an.importances(runs)
    if groups:
        add(
            "Hyperparameter importance",
            plots.importance(groups),
            "importance",
            "Optuna's fANOVA importance for final val/acc over completed and early-stopped search trials; "
            "momentum and amsgrad exist only for some optimizers, so they are ranked within their family.",
        )
        if notes:
            blocks.append(Bullets(notes))
    else:
        skip("Hyperparameter importance", "; ".join(notes) or "no trials")

    classes = an.class_names(s, runs)
    if best is not None and classes and all(finite(best.get(f"test/acc/{c}")) for c in classes):
        series = {f"best {best['trial_id']}": [best[f"test/acc/{c}"] for c in classes]}
        if base is not None and all(finite(base.get(f"test/acc/{c}")) for c in classes):
            series[f"baseline {base['trial_id']}"] = [base[f"test/acc/{c}"] for c in classes]
        if doc is not None and all(c in doc.per_class for c in classes):
            series["documented seed"] = [doc.per_class[c] for c in classes]
        add(
            "Per-class test accuracy",
            plots.per_class(classes, series),
            "per_class",
            "Test accuracy per class: the best trial against the re-measured baseline"
            + (" and the documented seed." if "documented seed" in series else "."),
        )
        blocks.append(
            Table(
                ["class", *series],
                [[c, *(pct(v[i]) for v in series.values())] for i, c in enumerate(classes)],
                right=tuple(range(1, len(series) + 1)),
            )
        )
    else:
        why = "no best trial" if best is None else "the best trial has no per-class test metrics (`test/acc/<class>`)"
        skip("Per-class test accuracy", why)

    if s.confusion is not None:
        tid = s.confusion.get("trial_id", "?")
        add(
            "Confusion matrix",
            plots.confusion([str(c) for c in s.confusion["classes"]], s.confusion["matrix"], f"trial {tid}"),
            "confusion",
            f"Test-set confusion matrix of trial {tid} (rows true class, columns predicted; colour is the row "
            "fraction).",
        )
    else:
        skip("Confusion matrix", "the sweep has no `eval/confusion.json` artifact")

    if s.samples is not None and len(s.samples["labels"]):
        n = len(s.samples["labels"])
        right = int((s.samples["preds"] == s.samples["labels"]).sum())
        add(
            "Test images",
            plots.samples(s.samples),
            "samples",
            f"{n} test images with the best model's prediction, its probability and the true class "
            f"({right} of {n} right; wrong ones in red).",
        )
    else:
        skip("Test images", "the sweep has no `eval/samples.npz` artifact")


def _baseline_marks(doc: Documented | None, base: pd.Series | None) -> list[tuple[str, float]]:
    marks = []
    if doc is not None:
        marks.append((f"documented baseline (test) {pct(doc.test_acc)}", doc.test_acc))
    if base is not None and finite(base["val/acc"]):
        marks.append((f"re-measured baseline (val) {pct(base['val/acc'])}", float(base["val/acc"])))
    return marks


def _comparison(loaded: list[SweepData], task: str, out_dir: Path, blocks: list[Block], pngs: list[Path]) -> None:
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
                _confirmed(runs, best) or "–",
                pct(base["test/acc"]) if base is not None else "–",
                duration(an.wall_seconds(s)),
                (_beat(first) if first is not None else "not beaten") if doc else "–",
            ]
        )
    header = ["sweep", "started", "search trials", "max_epochs", "gpus_per_trial", "best val/acc"]
    header += ["its test/acc", "its confirmed test/acc", "baseline test/acc (re-measured)", "wall time"]
    header += [f"first beat {pct(doc.test_acc)} (val/acc)" if doc else "first beat documented"]
    blocks.append(Table(header, rows, right=(3, 4, 5, 6, 7, 8, 9)))
    hists = {s.name: an.history(s.runs) for s in loaded}
    hists = {k: v for k, v in hists.items() if v["value"].notna().any()}
    if hists:
        marks = [(f"documented baseline (test) {pct(doc.test_acc)}", doc.test_acc)] if doc else []
        path = plots.save(
            plots.compare_best_so_far(hists, marks, f"{task}: best val/acc so far, per sweep"),
            out_dir / "compare_best_so_far.png",
        )
        pngs.append(path)
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
    return runs.assign(_order=order).sort_values(["_order", "start"], kind="stable")[cols]
