"""The report's plots section: which figures a sweep gets, their captions, and why one is left out."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from reports import analysis as an
from reports import plots
from reports.data import SweepData, metric_history
from reports.fmt import pct
from reports.render import Block, Bullets, Heading, Image, Para, Table
from sweeps.spec import DOCUMENTED, METRIC, SEARCH_PARAMS, Documented, finite

TOP_CURVES = 5


def plots_section(s: SweepData, task: str, out_dir: Path, prefix: str, blocks: list[Block], pngs: list[Path], h: int):
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

    lines = baseline_marks(doc, base)
    hist = an.history(runs)
    if hist["value"].notna().any():
        add(
            "Best val/acc so far",
            plots.best_so_far(hist, lines, f"{s.name}: best val/acc so far"),
            "best_so_far",
            "Final val/acc of each search trial and the best so far, by trial number and by wall time; red lines "
            "are the baselines, and a red arrow at the top or bottom edge names one too far off the trials' range "
            "to draw without squeezing them.",
        )
    else:
        skip("Best val/acc so far", "no search trial reported a val/acc")

    ranked = an.ranked(runs)
    one_epoch = not ranked.empty and bool((ranked["epochs_run"] <= 1).all())  # curves of one point each
    ranked = ranked.head(TOP_CURVES)
    if one_epoch:
        skip(
            "Learning curves",
            "every search trial logged a single epoch, so each curve would be one point; their final val/acc is "
            "in the best-so-far plot above",
        )
    elif len(ranked):
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
            f"val/acc per epoch of the top {len(ranked)} search trials"
            + (
                "; the re-measured baseline dashed (named at the edge instead when it ends far off their range)."
                if base_curve
                else "."
            ),
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

    n = len(trials)
    groups, notes = an.importances(runs) if n >= an.MIN_TRIALS else ({}, [too_few_for_importance(n)])
    notes = [readable(note) for note in notes]
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


def too_few_for_importance(n: int) -> str:
    trials = "no completed or early-stopped search trial" if n == 0 else f"{n} completed or early-stopped search trial"
    return (
        f"{trials}{'s' if n > 1 else ''}; fANOVA needs about {an.MIN_TRIALS} before its ranking means more than noise"
    )


def readable(note: str) -> str:
    """analysis.importances' note on a group of trials it left out, as a sentence for the report's reader."""
    if m := re.fullmatch(r"(.+): (\d+) finished trial\(s\), fewer than (\d+); importance skipped", note):
        group, n, need = m.groups()
        return f"{group} not ranked on their own: {n} of them, and fANOVA needs about {need}"
    if m := re.fullmatch(r"(.+): no hyperparameter varied; importance skipped", note):
        return f"{m.group(1)} not ranked: no hyperparameter varied across them"
    return note


def baseline_marks(doc: Documented | None, base: pd.Series | None) -> list[tuple[str, float]]:
    marks = []
    if doc is not None:
        marks.append((f"documented baseline (test) {pct(doc.test_acc)}", doc.test_acc))
    if base is not None and finite(base["val/acc"]):
        marks.append((f"re-measured baseline (val) {pct(base['val/acc'])}", float(base["val/acc"])))
    return marks
