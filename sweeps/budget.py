"""What a sweep may spend, and how long it has left: `--budget-by time|epochs`, the cost guard's limit,
ASHA's rungs, and the ETA.

    budget = plan(settings_like, data, concurrency)        # once, at the start (measures the baseline)
    asha_kw = budget.asha(max_epochs, grace_epochs)        # ASHA's time_attr, max_t, grace_period
    eta = Eta(total, concurrency, cap_s, share, guess_s); eta.seen(...); eta.end(...); eta.left_s()

In time mode ASHA's rungs count each trial's training seconds (`cost/train_s`, summed over its
epochs; not time spent waiting for a slot), so a cheap and an expensive configuration are compared
after the same cost. Its last rung and the cost guard's limit are `--max-trial-minutes`, or
TRIAL_FACTOR times what the task's reference configuration (its spec's `base`: the middle of the
search space) would take at the sweep's epochs, measured at the start from its pace on this machine
(a few hundred steps). The seed baseline is measured the same way: it trains as many of its epochs
as fit in the reference's time (a typical trial's), and is left out (said on stdout; the report
compares with its documented figure) when not even one does. Epochs mode is ASHA on epochs, as before, with no guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from cnnclf.config import TrainConfig
from cnnclf.train import PROBE_STEPS, train
from sweeps.journal_checks import SWEEP_KEY  # not sweeps.journal: benchmarks/gpu.py runs without MLflow
from sweeps.spec import SEARCH_PARAMS

TRIAL_FACTOR = 2.0  # a trial may train for this many times the reference configuration's time at the sweep's epochs
MIN_TRIAL_S = 60.0  # ... but never less than this: the guard is for trials that cost minutes, not seconds
REDUCTION = 3  # ASHA's reduction factor
RUNGS = 3  # time mode: rungs at max/9, max/3 and max
SLACK = 1.25  # ASHA's max_t over the guard's limit: a trial projected to fit is not cut before its last epoch
LONG_S = 2 * 3600.0  # a projection over this at the start, without a GPU, says how to shrink the sweep


@dataclass(frozen=True)
class Budget:
    mode: str  # time | epochs
    max_trial_s: float | None  # time mode: the cost guard's limit (None in epochs mode)
    source: str  # where the limit came from, in words
    baseline_s: float | None = None  # the baseline's training seconds at the sweep's epochs (measured at start)
    baseline_epoch_s: float | None = None  # ... for one epoch
    reference_s: float | None = None  # the reference configuration's training seconds at the sweep's epochs

    def baseline_epochs(self, wanted: int) -> int:
        """How many of its `wanted` epochs the baseline trains: in time mode as many as fit in a typical
        trial's time, the reference configuration's (within the limit; 0: not one does, it is left out),
        else all."""
        if self.mode != "time" or self.max_trial_s is None or not self.baseline_epoch_s:
            return wanted
        typical = max(self.reference_s or math.inf, MIN_TRIAL_S)  # a smoke test's reference takes a second
        return min(wanted, int(min(self.max_trial_s, typical) / self.baseline_epoch_s))

    def asha(self, max_epochs: int, grace_epochs: int) -> dict:
        """ASHA's time_attr, max_t and grace_period for this budget."""
        if self.mode == "epochs" or self.max_trial_s is None:
            return {"time_attr": "epoch", "max_t": max_epochs, "grace_period": min(grace_epochs, max_epochs)}
        return {
            "time_attr": "cost/train_s",
            "max_t": self.max_trial_s * SLACK,
            "grace_period": self.max_trial_s / REDUCTION ** (RUNGS - 1),
        }

    def describe(self, scheduler: str = "asha") -> str:
        if self.mode == "epochs":
            how = "ASHA's rungs count epochs" if scheduler == "asha" else "FIFO"
            return f"budget by epochs: {how}; no cost guard"
        if self.max_trial_s is None:
            return f"budget by time: no limit ({self.source})"
        m = self.max_trial_s
        rungs = ", ".join(duration(m / REDUCTION**k) for k in reversed(range(RUNGS)))
        how = f"ASHA's rungs at {rungs} of each trial's training" if scheduler == "asha" else "FIFO (no ASHA)"
        return f"budget by time: {how}; a search trial projected over {duration(m)} stops as too_slow ({self.source})"


def expected_fraction(rungs: list[float], max_t: float, reduction: int = REDUCTION) -> float:
    """The share of a full trial that ASHA lets an average trial train: all reach the first rung, 1 in
    `reduction` the next, and so on (its steady state; the first trials at a rung always go on)."""
    if not rungs or max_t <= 0:
        return 1.0
    points = [*sorted(r for r in rungs if r < max_t), max_t]
    spent, survive = points[0], 1.0
    for a, b in itertools.pairwise(points):
        survive /= reduction
        spent += survive * (b - a)
    return min(1.0, spent / max_t)


def asha_fraction(budget: Budget, scheduler: str, max_epochs: int, grace_epochs: int) -> float:
    if scheduler != "asha":
        return 1.0
    kw = budget.asha(max_epochs, grace_epochs)
    g, top = kw["grace_period"], kw["max_t"] / (SLACK if kw["time_attr"] != "epoch" else 1.0)
    rungs = [g * REDUCTION**k for k in range(16) if g * REDUCTION**k < top]
    return expected_fraction(rungs, top)


def measure_pace(cfg: TrainConfig, data, device: str, threads: int) -> float:
    """Images per second of `cfg`'s training on this machine, over its first few hundred steps."""

    class Measured(Exception):
        pass

    def probe(pace) -> None:
        raise Measured(pace)

    n = min(len(data.train_y), cfg.batch_size * (PROBE_STEPS + 1))
    small = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        train(cfg.replace(epochs=1), small, None, device=device, probe=probe)
    except Measured as m:
        pace = m.args[0]
        return pace.images / max(pace.seconds, 1e-9)
    finally:
        torch.set_num_threads(before)
    return math.nan  # the probe always fires; kept for type checkers


@dataclass(frozen=True)
class Machine:
    """Where a pace is measured: the device and the CPU threads a trial trains with."""

    device: str
    threads: int


def plan(mode: str, max_trial_minutes: float | None, configs: tuple[TrainConfig, TrainConfig], epochs: int, data,
         machine: Machine) -> Budget:  # fmt: skip
    """The sweep's Budget: the limit given, or TRIAL_FACTOR x the reference's measured time at `epochs` epochs.
    `configs`: (the baseline, the reference configuration), their paces measured on `machine`."""
    n = len(data.train_y)

    def seconds(cfg: TrainConfig) -> float | None:  # one epoch of cfg here; None where it cannot be measured
        pace = math.nan
        with contextlib.suppress(Exception):  # the limit is then left to the flag
            pace = measure_pace(cfg, data, machine.device, machine.threads)
        return n / pace if math.isfinite(pace) and pace > 0 else None

    baseline_epoch_s, reference_epoch_s = seconds(configs[0]), seconds(configs[1])
    baseline_s = baseline_epoch_s * epochs if baseline_epoch_s else None
    reference_s = reference_epoch_s * epochs if reference_epoch_s else None
    paces = {"baseline_s": baseline_s, "baseline_epoch_s": baseline_epoch_s, "reference_s": reference_s}
    if mode == "epochs":
        return Budget("epochs", None, "", **paces)
    if max_trial_minutes is not None:
        return Budget("time", max_trial_minutes * 60.0, "--max-trial-minutes", **paces)
    if reference_s is None:
        return Budget("time", None, "the reference configuration could not be measured: no limit", **paces)
    source = (
        f"{TRIAL_FACTOR:g}x the reference configuration's {duration(reference_s)} for {epochs} epoch(s) at its "
        f"measured {n / reference_epoch_s:,.0f} images/s, at least {duration(MIN_TRIAL_S)}; "
        "--max-trial-minutes sets it"
    )
    return Budget("time", max(MIN_TRIAL_S, TRIAL_FACTOR * reference_s), source, **paces)


def duration(s: float) -> str:
    """Seconds in words: 4.2 s, 59 s, 3.0 min, 2.1 h."""
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


@dataclass
class TrialPace:
    planned_images: float  # n_train x its epochs
    spent_s: float = 0.0  # cost/train_s
    images: float = 0.0  # cost/images
    img_s: float = 0.0  # throughput/train_img_s

    def full_s(self, cap: float | None) -> float:
        """Its whole training, projected from its pace (capped at the limit in time mode)."""
        if self.img_s <= 0:
            return math.nan
        full = self.spent_s + max(0.0, self.planned_images - self.images) / self.img_s
        return min(full, cap) if cap else full


class Eta:
    """The sweep's remaining wall time, from measured paces: the running trials' whole rest, the trials not
    yet measured at the mean projected cost of the search trials seen (before any: `guess_s`, the start's
    projection) times ASHA's expected share, over the trials that run at once; then the phases still to come
    (`later`: the confirmation's runs, each a whole training of about that mean cost). Never less than the
    longest rest of a running trial; 0.0 when nothing is left."""

    def __init__(
        self,
        total: int,
        concurrency: int,
        cap_s: float | None,
        fraction: float,
        guess_s: float | None = None,
        later: int = 0,
    ) -> None:
        self.total, self.concurrency, self.cap_s, self.fraction = total, max(1, concurrency), cap_s, fraction
        self.guess_s, self.later = guess_s, later
        self.trials: dict[str, TrialPace] = {}
        self.ended: set[str] = set()
        self.search: set[str] = set()  # trials ASHA may stop (not the baseline)

    def seen(self, trial_id: str, planned_images: float, result: dict, search: bool) -> None:
        p = self.trials.setdefault(trial_id, TrialPace(planned_images))
        p.spent_s = float(result.get("cost/train_s", p.spent_s) or 0.0)
        p.images = float(result.get("cost/images", p.images) or 0.0)
        p.img_s = float(result.get("throughput/train_img_s", p.img_s) or 0.0)
        if search:
            self.search.add(trial_id)

    def end(self, trial_id: str) -> None:
        self.ended.add(trial_id)

    def left_s(self) -> float | None:
        """Seconds left, or None before any trial reported a pace."""
        if not self.trials:
            return None
        fulls = [f for t in self.search if math.isfinite(f := self.trials[t].full_s(self.cap_s))]
        rests = []
        for tid, p in self.trials.items():
            full = p.full_s(self.cap_s)
            if tid not in self.ended and not math.isnan(full):
                rests.append(max(0.0, full - p.spent_s))  # a trial past its first rungs mostly runs on: its whole rest
        mean = sum(fulls) / len(fulls) if fulls else (self.guess_s or 0.0)
        unmeasured = max(0, self.total - len(set(self.trials) | self.ended))
        now = max((sum(rests) + unmeasured * mean * self.fraction) / self.concurrency, max(rests, default=0.0))
        return now + math.ceil(self.later / self.concurrency) * mean

    def done(self) -> bool:
        """Nothing is left of this phase or any after it."""
        return self.later == 0 and len(self.ended) >= self.total


def bar(done: int, total: int, best: float | None, left: float | None, width: int = 20, finished: bool = False) -> str:
    """One overall progress line: trials done, best val/acc so far, ETA ("done" when `finished`)."""
    filled = round(width * done / max(1, total))
    best_s = f"{best:.4f}" if best is not None and math.isfinite(best) else "-"
    eta = f"ETA about {duration(left)}" if left is not None else "ETA after the first results"
    eta = "done" if finished else eta
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} trials done, best val/acc {best_s}, {eta}"


def slots(resources: dict, cpus_per_trial: float, gpus: float, cap: int) -> int:
    """How many trials run at once: the cluster's CPUs (and GPUs) over a trial's share, at most `cap`."""
    n = int(resources.get("CPU", 1) // cpus_per_trial) or 1
    if gpus > 0 and resources.get("GPU", 0):
        n = min(n, int(resources["GPU"] // gpus) or 1)
    return max(1, min(n, cap))


def settle(s, journal, data, gpus: float, concurrency: int) -> Budget:
    """The sweep's Budget for Settings `s`, kept in the journal so a resumed sweep keeps its limit; said on
    stdout, with the sweep's length projected from the baseline's pace (and how to shrink a long one)."""
    kept = journal.meta.get("budget") or {}
    if kept.get("mode") == s.budget_by and s.max_trial_minutes is None:
        budget = Budget(**kept)
    else:
        device = "cuda" if gpus > 0 and _cuda() else "cpu"
        machine = Machine(device, int(s.cpus_per_trial))
        budget = plan(s.budget_by, s.max_trial_minutes, (s.baseline, reference(s)), s.max_epochs, data, machine)
        text = budget.describe(s.scheduler)
        journal.append("meta", data={"budget": dataclasses.asdict(budget), "budget_text": text})
        if journal.has_run(SWEEP_KEY):  # a resumed sweep's parent says the budget it goes on with
            journal.append("log", SWEEP_KEY, tags=[["budget", text]])
    print(budget.describe(s.scheduler), flush=True)
    if budget.reference_s is not None:
        share = asha_fraction(budget, s.scheduler, s.max_epochs, s.grace_period)
        per_trial = (budget.max_trial_s or TRIAL_FACTOR * budget.reference_s) * share
        baseline_epochs = budget.baseline_epochs(s.baseline.epochs) if s.with_baseline else 0
        baseline_s = (budget.baseline_epoch_s or 0.0) * baseline_epochs
        total = (baseline_s + s.num_samples * per_trial) / concurrency
        print(
            f"projected at the start: about {duration(total)} for {s.num_samples} search trials"
            f"{' and the baseline' if baseline_epochs else ''}, {concurrency} at a time "
            "(from the measured paces of the reference configuration and the baseline; the ETA follows the "
            "trials' own)",
            flush=True,
        )
        if total > LONG_S and gpus == 0:
            print(f"this is long without a GPU; to shrink it: {shrink_hint(s)}", flush=True)
    return budget


def reference(s) -> TrainConfig:
    """The configuration whose measured pace sets the time limit: the task's base (the middle of its search
    space) with the searched parameters --fix pins."""
    return s.base.replace(**{k: v for k, v in s.fixed.items() if k in SEARCH_PARAMS})


def baseline_line(s, budget: Budget) -> str | None:
    """What the budget leaves of the seed baseline, in words (None: it trains as the flags say)."""
    if not s.with_baseline or budget.baseline_epoch_s is None:
        return None
    k = budget.baseline_epochs(s.baseline.epochs)
    if k == s.baseline.epochs:
        return None
    per_epoch = f"{duration(budget.baseline_epoch_s)} per epoch here"
    if k == 0:
        return (
            f"the seed baseline is left out: one epoch of it ({per_epoch}) is longer than the reference "
            "configuration's training; "
            "the report compares with its documented figure"
        )
    return (
        f"the seed baseline trains {k} of its {s.baseline.epochs} epochs ({per_epoch}): what fits in the reference "
        "configuration's time"
    )


def shrink_hint(s) -> str:
    """The flags that make a sweep cheaper, for this task and these settings."""
    hints = []
    if s.base.image_size > 64:
        hints.append("--fix image_size=64 (a quarter of the pixels of 128)")
    hints.append("--subset 10000 (fewer training images)")
    hints.append(f"--num-samples {max(4, s.num_samples // 2)} (fewer trials)")
    if s.budget_by == "time":
        hints.append("--max-trial-minutes (a lower cap per trial)")
    return ", ".join(hints)


def _cuda() -> bool:

    return torch.cuda.is_available()
