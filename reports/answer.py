"""The report's first two sections: the sweep's answer (which configuration, how sure, against what) and
the confirmation runs it rests on. The rule is the sweep's own (sweeps.spec.answer), so the report, the
console, best_config.json and the MLflow parent run name the same configuration."""

from __future__ import annotations

import pandas as pd

from reports import analysis as an
from reports.data import SweepData
from reports.fmt import duration, pct, value
from reports.render import Block, Heading, Para, Table
from sweeps.spec import DOCUMENTED, ROLES, SEARCH_PARAMS, Answer, Confirmed, Run, chance_flag, finite
from sweeps.stats import Estimate, one_run

CONFIRM_HEADER = ["confirmed trial", "search rank", "its val/acc", "its test/acc", "test/acc over fresh seeds"]
CONFIRM_HEADER += ["val/acc over fresh seeds", "seeds", "not finished", "judged"]


def headline(s: SweepData, blocks: list[Block], h: int) -> Answer | None:
    """The recommended configuration, its test accuracy with a 95% interval, and how it compares with the
    runner-up and the baselines (a difference is judged against the noise; a budget difference is named)."""
    runs, task = s.runs, an.task_of(s)
    blocks.append(Heading(h, "Headline"))
    ans = an.answer(runs)
    if ans is None:
        blocks.append(Para("No search trial finished with a val/acc, so there is no configuration to recommend."))
        _wall_line(s, blocks)
        return None
    trial = an.best(runs)
    assert trial is not None  # an answer has a search trial
    blocks.append(Para(f"**Recommended configuration**: trial `{ans.trial.trial_id}`, {_why(ans, runs)}."))
    blocks.append(
        Para(
            f"Search trial `{ans.trial.trial_id}`, val/acc **{pct(trial['val/acc'])}**, test/acc "
            f"**{pct(trial['test/acc'])}** (#{ans.search_rank} of the search by val/acc)."
        )
    )
    test = ans.test
    if finite(test.mean):
        blocks.append(Para(f"Test accuracy **{test.text()}**; val/acc {ans.val.text()}."))
    else:
        blocks.append(Para(f"val/acc {pct(ans.val.mean)}; no test accuracy: the trial was stopped early."))
    if ans.flag:
        blocks.append(Para(f"**Warning: {ans.flag}.** Its accuracy says nothing about the configuration."))
    if ans.reordered:
        blocks.append(
            Para(
                f"Confirmation reordered the search: the search's best by val/acc, `{ans.search_top.trial_id}`, "
                f"did worse over fresh seeds than `{ans.trial.trial_id}` (search #{ans.search_rank}), so the "
                "recommendation follows the confirmation."
            )
        )
    hp = [f"{k}={value(trial[k])}" for k in (*SEARCH_PARAMS, "epochs") if k in trial and value(trial[k]) != ""]
    blocks.append(Para("Its hyperparameters: " + ", ".join(f"`{x}`" for x in hp) + "."))
    _comparisons(s, ans, trial, task, blocks)
    _wall_line(s, blocks)
    return ans


def _why(ans: Answer, runs: pd.DataFrame) -> str:
    if ans.confirmed is not None:
        c = ans.confirmed
        where = f"search #{ans.search_rank}" if ans.search_rank > 1 else "also the search's best"
        return (
            f"the confirmed configuration with the highest mean val/acc over {c.val.n} fresh "
            f"seed{'s' if c.val.n != 1 else ''} ({where}; the "
            "search trial itself is not counted, and the test set chose nothing)"
        )
    searched = an.visible(runs)
    n_full = int(((searched["role"] == "trial") & (searched["outcome"] == "completed")).sum())
    if ans.trial.outcome != "completed":
        return "one unconfirmed run: no search trial ran all its epochs, so this is the best early-stopped one"
    return (
        f"**one unconfirmed run**: the highest final val/acc among the {n_full} search trials that ran all their "
        "epochs (no confirmation run completed; `--confirm N` retrains the top with N fresh seeds)"
    )


def _comparisons(s: SweepData, ans: Answer, trial: pd.Series, task: str, blocks: list[Block]) -> None:
    runs = s.runs
    rows = []
    if ans.runner_up is not None:
        r = ans.runner_up
        rows.append(
            [
                f"runner-up `{r.trial.trial_id}`, confirmed",
                r.test.short(),
                _diff(ans.vs_runner_up()),
                "the same",
                "–",
            ]
        )
    base = an.baseline(runs)
    if base is not None and ans.baseline is not None:
        b = ans.baseline
        est = b.test_estimate()
        flag = _flag(est, b)
        first = an.first_beat(runs, base["val/acc"]) if finite(base["val/acc"]) else None
        rows.append(
            [
                f"re-measured baseline `{b.trial_id}` ({base['outcome']}, "
                f"epochs {value(base.get('epochs_run'))}/{value(base.get('epochs'))}){flag}",
                est.short(),
                _diff(ans.vs_baseline()),
                "the same data",
                beat(first) if finite(base["val/acc"]) else "– (the baseline has no val/acc)",
            ]
        )
    doc = DOCUMENTED.get(task)
    if doc is not None:
        differs = doc.budget_differences(trial.get("epochs"), _train_images(s, trial), trial.get("image_size"))
        first = an.first_beat(runs, doc.test_acc)
        gap = ans.test.mean - doc.test_acc
        rows.append(
            [
                f"documented: {doc.what}",
                pct(doc.test_acc),
                f"{100 * gap:+.2f} pts (a documented figure: no interval)" if finite(gap) else "–",
                ("**another budget**: " + ", ".join(differs)) if differs else "the same",
                beat(first),
            ]
        )
    if base is None:
        blocks.append(Para("No baseline run (role=baseline) in this sweep (`--no-baseline`, or it was lost)."))
    if not rows:
        return
    header = ["compared with", "its test/acc", "recommended − it (test/acc)", "budget", "first beaten after"]
    blocks.append(Table(header, rows, right=(1, 2)))
    blocks.append(
        Para(
            "Intervals are 95%: across seeds (Student t) for a mean, Wilson's on the test set's size for one run. "
            "A difference is “larger than the noise” when Welch's t-test gives p < 0.05 (a single run counts "
            "with its binomial error on the test set). Accuracies trained with another budget are not like for "
            "like."
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


def _flag(est: Estimate, run: Run) -> str:
    flag = chance_flag(est, (run,))
    return f"; **{flag}**" if flag else ""


def _diff(d) -> str:
    return d.text(short=True) if d is not None else "–"


def _train_images(s: SweepData, trial: pd.Series) -> float | None:
    """The training images of the sweep: the parent's `data.train_n` tag, else the trial's subset."""
    n = s.parent["tags"].get("data.train_n")
    if n is not None and str(n).isdigit():
        return float(n)
    return float(trial["subset"]) if finite(trial.get("subset")) else None


def _budget_line(s: SweepData) -> str:
    """Which budget mode ran: what ASHA's rungs counted, and the cost guard's limit (sweeps/budget.py)."""
    text = s.parent["tags"].get("budget")
    if text:
        return f"**Budget**: {text.removeprefix('budget ')}."
    return "**Budget**: by epochs (ASHA's rungs counted epochs; a sweep from before time budgets, or run with FIFO)."


def beat(first: pd.Series | None) -> str:
    if first is None:
        return "not beaten"
    return f"{duration(first['elapsed_s'])} (trial `{first['trial_id']}`, val/acc {pct(first['value'])})"


def _wall_line(s: SweepData, blocks: list[Block]) -> None:
    vis = an.visible(s.runs)
    doc = DOCUMENTED.get(an.task_of(s))
    counts = {r: int((vis["role"] == r).sum()) for r in ROLES}
    line = (
        f"Sweep wall time: **{duration(an.wall_seconds(s))}** (first trial start to last run end) for "
        f"{counts['trial']} search trials, {counts['baseline']} baseline and {counts['confirm']} confirmation runs."
    )
    if doc is not None and doc.hours:
        line += f" The documented seed trained for {doc.hours:g} hours."
    blocks.append(Para(line))


def confirmation(s: SweepData, ans: Answer | None, blocks: list[Block], h: int) -> None:
    """Every confirmed configuration, best mean val/acc first (the order that recommends), with intervals."""
    blocks.append(Heading(h, "Confirmation with fresh seeds"))
    conf = an.confirmations(s.runs)
    if conf.empty:
        blocks.append(
            Para(
                "No confirmation runs (role=confirm) in this sweep: `--confirm N` retrains the top configurations "
                "with N fresh seeds, and the recommendation then follows their mean val/acc."
            )
        )
        return
    ranking: list[Confirmed] = list(ans.ranking) if ans else []
    rank_of = {t: i for i, t in enumerate(an.ranked(s.runs)["trial_id"], start=1)}
    rows = []
    by_of = {r.confirm_of: r for r in conf.itertuples()}
    for c in ranking:
        r = by_of.get(c.trial.trial_id)
        rows.append(
            [
                f"`{c.trial.trial_id}`" + (" (recommended)" if ans and c.trial.trial_id == ans.trial.trial_id else ""),
                f"#{rank_of.get(c.trial.trial_id, '?')}",
                pct(c.trial.val),
                one_run(c.trial.test, c.trial.test_n).short() if finite(c.trial.test) else "–",
                c.test.short(),
                c.val.short(),
                r.seeds if r is not None else "",
                str(c.failed),
                c.flag or "",
            ]
        )
    done = {c.trial.trial_id for c in ranking}
    for r in conf.itertuples():  # configurations none of whose confirmation runs completed
        if r.confirm_of not in done:
            rows.append([f"`{r.confirm_of}`", f"#{rank_of.get(r.confirm_of, '?')}", pct(r.orig_val)])
            rows[-1] += [pct(r.orig_test), "–", "–", "", str(r.not_finished), "no run completed"]
    blocks.append(Table(CONFIRM_HEADER, rows, right=(1, 2, 3, 4, 5, 7)))
    blocks.append(
        Para(
            "Ordered by mean val/acc over the fresh seeds, which chooses the recommendation; the search trial "
            "itself is not among the n runs (it was picked because it scored high). Mean ± sample standard "
            "deviation in percentage points, with the 95% interval across seeds."
        )
    )
