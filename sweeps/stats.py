"""How sure an accuracy is: 95% intervals and differences, written once for the sweep and the report.

Two kinds of evidence reach the report:
- one run, measured on a test set of n images: its accuracy is a binomial proportion, and its 95%
  interval is Wilson's (sensible near 0% and 100%, unlike the normal approximation);
- several runs of one configuration with fresh seeds: their mean, with a Student-t interval across
  seeds (the seed-to-seed spread is the larger noise at these test-set sizes).

A difference between two such estimates is judged by Welch's t-test: each side contributes its
squared standard error, a single run its binomial one (with infinite degrees of freedom), and the
degrees of freedom are Welch-Satterthwaite's. "Larger than the noise" means p < 0.05, two-sided.

A leaf module (scipy only), below sweeps.spec.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _scipy():
    """scipy.stats, imported on a statistic's first use: half a second that a trial's worker and a mistyped flag,
    which import this module through sweeps.spec, never need."""
    from scipy import stats

    return stats


LEVEL = 0.95  # every interval the project prints
ALPHA = 1 - LEVEL


@dataclass(frozen=True)
class Estimate:
    """An accuracy with its noise: `mean` (fraction), `se` its standard error, `df` the degrees of freedom
    of that error (math.inf for a binomial one), `n` the runs behind it, `lo`/`hi` its 95% interval."""

    mean: float
    se: float
    df: float
    n: int
    lo: float
    hi: float
    kind: str  # "seeds" (a mean over runs) or "binomial" (one run on n_test images)
    n_test: float = math.nan  # binomial: the test images it was measured on

    @property
    def std(self) -> float:
        """The sample standard deviation across seeds (NaN for one run)."""
        return self.se * math.sqrt(self.n) if self.kind == "seeds" else math.nan

    def short(self) -> str:
        """A table cell: `33.38% ± 1.12 (95% CI 30.59–36.17, n=3)` or `30.11% (95% CI 22.89–38.47, 1 run)`."""
        if not math.isfinite(self.mean):
            return "–"
        ci = f"95% CI {100 * self.lo:.2f}–{100 * self.hi:.2f}, " if math.isfinite(self.lo) else ""
        if self.kind == "seeds" and self.n > 1:
            return f"{pct(self.mean)} ± {100 * self.std:.2f} ({ci}n={self.n})"
        return f"{pct(self.mean)} ({ci}1 run)"

    def text(self) -> str:
        """`33.38% ± 1.12 (n=3 seeds; 95% CI 30.59–36.17%)`, or `30.11% (one run; 95% CI 22.89–38.47% on
        130 test images)`: percent, the std in points."""
        if not math.isfinite(self.mean):
            return "–"
        if self.kind == "seeds" and self.n > 1:
            return f"{pct(self.mean)} ± {100 * self.std:.2f} (n={self.n} seeds; 95% CI {span(self.lo, self.hi)})"
        if self.kind == "seeds":
            return f"{pct(self.mean)} (n=1 seed: no interval)"
        if math.isfinite(self.lo):
            return f"{pct(self.mean)} (one run; 95% CI {span(self.lo, self.hi)} on {self.n_test:,.0f} test images)"
        return f"{pct(self.mean)} (one run; no interval: test-set size not recorded)"

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def _nan() -> Estimate:
    return Estimate(math.nan, math.nan, math.nan, 0, math.nan, math.nan, "none")


def wilson(acc: float, n_test: float) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion `acc` measured on `n_test` items; (nan, nan) without them."""
    if not (n_test and n_test > 0 and math.isfinite(acc) and math.isfinite(n_test)):
        return math.nan, math.nan
    z = float(_scipy().norm.ppf(1 - ALPHA / 2))
    denom = 1 + z * z / n_test
    centre = (acc + z * z / (2 * n_test)) / denom
    half = z * math.sqrt(acc * (1 - acc) / n_test + z * z / (4 * n_test * n_test)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def one_run(acc: float, n_test: float | None) -> Estimate:
    """One run's accuracy on `n_test` test images (None or NaN: unknown, so no interval)."""
    if not (isinstance(acc, int | float) and math.isfinite(acc)):
        return _nan()
    if not (n_test and math.isfinite(n_test) and n_test > 0):
        return Estimate(acc, math.nan, math.nan, 1, math.nan, math.nan, "binomial")
    lo, hi = wilson(acc, n_test)
    se = (hi - lo) / (2 * float(_scipy().norm.ppf(1 - ALPHA / 2)))  # Wilson's, so that 0% and 100% keep an error
    return Estimate(acc, se, math.inf, 1, lo, hi, "binomial", float(n_test))


def over_seeds(values: Sequence[float]) -> Estimate:
    """The mean of runs with fresh seeds and its Student-t 95% interval (none from a single run)."""
    xs = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return _nan()
    mean = statistics.fmean(xs)
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1, math.nan, math.nan, "seeds")
    se = statistics.stdev(xs) / math.sqrt(n)
    half = float(_scipy().t.ppf(1 - ALPHA / 2, n - 1)) * se
    return Estimate(mean, se, n - 1, n, mean - half, mean + half, "seeds")


@dataclass(frozen=True)
class Difference:
    """a − b with its 95% interval, Welch's two-sided p-value and whether it exceeds the noise."""

    diff: float
    lo: float
    hi: float
    p: float
    df: float

    def text(self, short: bool = False) -> str:
        """`+3.27 pts (95% CI −3.10 to +9.70; Welch p = 0.19): within the noise`; `short`, for a table cell:
        `+3.27 pts (95% CI −3.10 to +9.70), p = 0.19: within the noise`."""
        if not math.isfinite(self.diff):
            return "–"
        if not self.known:
            why = "" if short else ": one side is a single run without a spread"
            return f"{100 * self.diff:+.2f} pts (no noise estimate{why})"
        verdict = "larger than the noise" if self.beyond_noise else "within the noise"
        ci = f"95% CI {100 * self.lo:+.2f} to {100 * self.hi:+.2f}"
        if short:
            return f"{100 * self.diff:+.2f} pts ({ci}), p = {self.p:.2g}: {verdict}"
        return f"{100 * self.diff:+.2f} pts ({ci}; Welch p = {self.p:.2g}): {verdict}"

    @property
    def known(self) -> bool:
        return math.isfinite(self.p)

    @property
    def beyond_noise(self) -> bool:
        return self.known and self.p < ALPHA


def difference(a: Estimate, b: Estimate) -> Difference:
    """Welch's t-test of a − b. Unknown (NaN p) when either side has no standard error (one seed run
    without a test-set size, or a mean of one run); a zero spread on both sides is no evidence either."""
    diff = a.mean - b.mean
    if not all(math.isfinite(x) for x in (a.se, b.se, diff)) or a.se + b.se == 0:
        return Difference(diff, math.nan, math.nan, math.nan, math.nan)
    var = a.se**2 + b.se**2
    terms = [e.se**4 / e.df for e in (a, b) if math.isfinite(e.df)]
    df = var**2 / sum(terms) if terms and sum(terms) > 0 else math.inf
    se = math.sqrt(var)
    t = diff / se
    crit = float(_scipy().t.ppf(1 - ALPHA / 2, df) if math.isfinite(df) else _scipy().norm.ppf(1 - ALPHA / 2))
    p = 2 * (_scipy().t.sf(abs(t), df) if math.isfinite(df) else _scipy().norm.sf(abs(t)))
    return Difference(diff, diff - crit * se, diff + crit * se, float(p), float(df))


def at_chance(acc: Estimate, majority_acc: float | None) -> bool:
    """True when `acc`'s 95% interval reaches the accuracy of always answering the most frequent class."""
    if majority_acc is None or not math.isfinite(majority_acc) or not math.isfinite(acc.mean):
        return False
    lo = acc.lo if math.isfinite(acc.lo) else acc.mean
    return lo <= majority_acc


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def span(lo: float, hi: float) -> str:
    return f"{100 * lo:.2f}–{100 * hi:.2f}%"
