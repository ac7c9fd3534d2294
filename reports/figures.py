"""The report's plots section: which figures a sweep gets, their captions, and why one is left out."""

from __future__ import annotations

import re

import pandas as pd

from reports import analysis as an
from reports import plots
from reports.data import SweepData, metric_history
from reports.fmt import pct
from reports.render import Bullets, Heading, Image, Page, Para, Table
from sweeps.spec import DOCUMENTED, METRIC, SEARCH_PARAMS, Documented, finite

TOP_CURVES = 5


def plots_section(s: SweepData, page: Page, h: int) -> None:
    """One subsection per figure, in this order; a figure that cannot be drawn says why instead."""
    figures = (_best_so_far, _learning_curves, _parallel_coordinates, _importance, _per_class, _confusion, _samples)
    for figure in figures:
        figure(s, page, h)


def _add(page: Page, h: int, title: str, fig, name: str, caption: str) -> None:
    path = plots.save(fig, page.png(name))
    page.pngs.append(path)
    page.blocks.append(Heading(h, title))
    page.blocks.append(Image(path, caption))


def _skip(page: Page, h: int, title: str, why: str) -> None:
    page.blocks.append(Heading(h, title))
    page.blocks.append(Para(f"Not drawn: {why}."))


def _best_so_far(s: SweepData, page: Page, h: int) -> None:
    hist = an.history(s.runs)
    if not hist["value"].notna().any():
        _skip(page, h, "Best val/acc so far", "no search trial reported a val/acc")
        return
    lines = baseline_marks(DOCUMENTED.get(an.task_of(s)), an.baseline(s.runs))
    _add(
        page,
        h,
        "Best val/acc so far",
        plots.best_so_far(hist, lines, f"{s.name}: best val/acc so far"),
        "best_so_far",
        "Final val/acc of each search trial and the best so far, by trial number and by wall time; red lines "
        "are the baselines, and a red arrow at the top or bottom edge names one too far off the trials' range "
        "to draw without squeezing them.",
    )


def _learning_curves(s: SweepData, page: Page, h: int) -> None:
    ranked = an.ranked(s.runs)
    if not ranked.empty and bool((ranked["epochs_run"] <= 1).all()):  # curves of one point each
        why = "every search trial logged a single epoch, so each curve would be one point; their final val/acc is "
        _skip(page, h, "Learning curves", why + "in the best-so-far plot above")
        return
    ranked = ranked.head(TOP_CURVES)
    if not len(ranked):
        _skip(page, h, "Learning curves", "no search trial reported a val/acc")
        return
    curves = {
        f"#{r['rank']} {r['trial_id']} ({pct(r['val/acc'])})": metric_history(s.tracking_uri, r.run_id, "val/acc")
        for _, r in ranked.iterrows()
    }
    base, base_curve = an.baseline(s.runs), None
    if base is not None:
        bc = metric_history(s.tracking_uri, base["run_id"], "val/acc")
        base_curve = (f"baseline {base['trial_id']}", bc) if len(bc) else None
    _add(
        page,
        h,
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


def _parallel_coordinates(s: SweepData, page: Page, h: int) -> None:
    trials = an.importance_trials(s.runs)
    params = [p for p in SEARCH_PARAMS if p in trials and trials[p].notna().any()]
    params += [p for p in an.varying(trials, an.hyperparams(trials)) if p not in params]
    params.sort(key=lambda p: an.PARAM_ORDER.index(p) if p in an.PARAM_ORDER else len(an.PARAM_ORDER))
    if len(trials) < 2 or not params:
        _skip(page, h, "Parallel coordinates", f"{len(trials)} search trial(s) with a val/acc, fewer than 2")
        return
    _add(
        page,
        h,
        "Parallel coordinates",
        plots.parallel_coordinates(trials, params, METRIC, an.LOG_PARAMS),
        "parallel_coordinates",
        "One line per completed or early-stopped search trial, coloured by its final val/acc (the best "
        "thickest); lr and weight_decay on log axes; n/a where the optimizer has no such setting.",
    )


def _importance(s: SweepData, page: Page, h: int) -> None:
    n = len(an.importance_trials(s.runs))
    groups, notes = an.importances(s.runs) if n >= an.MIN_TRIALS else ({}, [too_few_for_importance(n)])
    notes = [readable(note) for note in notes]
    if not groups:
        _skip(page, h, "Hyperparameter importance", "; ".join(notes) or "no trials")
        return
    _add(
        page,
        h,
        "Hyperparameter importance",
        plots.importance(groups),
        "importance",
        "Optuna's fANOVA importance for final val/acc over completed and early-stopped search trials; "
        "momentum and amsgrad exist only for some optimizers, so they are ranked within their family.",
    )
    if notes:
        page.blocks.append(Bullets(notes))


def _per_class(s: SweepData, page: Page, h: int) -> None:
    best, base, doc = an.best(s.runs), an.baseline(s.runs), DOCUMENTED.get(an.task_of(s))
    classes = an.class_names(s, s.runs)
    if best is None or not classes or not all(finite(best.get(f"test/acc/{c}")) for c in classes):
        why = "no best trial" if best is None else "the best trial has no per-class test metrics (`test/acc/<class>`)"
        _skip(page, h, "Per-class test accuracy", why)
        return
    series = {f"best {best['trial_id']}": [best[f"test/acc/{c}"] for c in classes]}
    if base is not None and all(finite(base.get(f"test/acc/{c}")) for c in classes):
        series[f"baseline {base['trial_id']}"] = [base[f"test/acc/{c}"] for c in classes]
    if doc is not None and all(c in doc.per_class for c in classes):
        series["documented seed"] = [doc.per_class[c] for c in classes]
    _add(
        page,
        h,
        "Per-class test accuracy",
        plots.per_class(classes, series),
        "per_class",
        "Test accuracy per class: the best trial against the re-measured baseline"
        + (" and the documented seed." if "documented seed" in series else "."),
    )
    page.blocks.append(
        Table(
            ["class", *series],
            [[c, *(pct(v[i]) for v in series.values())] for i, c in enumerate(classes)],
            right=tuple(range(1, len(series) + 1)),
        )
    )


def _confusion(s: SweepData, page: Page, h: int) -> None:
    if s.confusion is None:
        _skip(page, h, "Confusion matrix", "the sweep has no `eval/confusion.json` artifact")
        return
    tid = s.confusion.get("trial_id", "?")
    _add(
        page,
        h,
        "Confusion matrix",
        plots.confusion([str(c) for c in s.confusion["classes"]], s.confusion["matrix"], f"trial {tid}"),
        "confusion",
        f"Test-set confusion matrix of trial {tid} (rows true class, columns predicted; colour is the row fraction).",
    )


def _samples(s: SweepData, page: Page, h: int) -> None:
    if s.samples is None or not len(s.samples["labels"]):
        _skip(page, h, "Test images", "the sweep has no `eval/samples.npz` artifact")
        return
    n = len(s.samples["labels"])
    right = int((s.samples["preds"] == s.samples["labels"]).sum())
    _add(
        page,
        h,
        "Test images",
        plots.samples(s.samples),
        "samples",
        f"{n} test images with the best model's prediction, its probability and the true class "
        f"({right} of {n} right; wrong ones in red).",
    )


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
