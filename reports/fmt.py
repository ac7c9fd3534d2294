"""How numbers read in the report: accuracies are fractions in MLflow and percent with two decimals here."""

from __future__ import annotations

import math

import numpy as np

from sweeps.spec import finite


def pct(x) -> str:
    return f"{100 * x:.2f}%" if finite(x) else "–"


def pts(d) -> str:
    return f"{100 * d:+.2f} pts" if finite(d) else "–"


def mean_std(mean, std, n: int) -> str:
    """`mean ± std` in percent; the std of one run is undefined (NaN in confirmation_stats) and never shown."""
    if not n or not finite(mean):
        return "–"
    if n == 1 or not finite(std):
        return f"{pct(mean)} ({'one run' if n == 1 else f'n={n}'}, no std)"
    return f"{pct(mean)} ± {100 * std:.2f}"


def duration(seconds) -> str:
    if not finite(seconds):
        return "–"
    s = round(seconds)
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m" if h else (f"{m}m {sec:02d}s" if m else f"{sec}s")


def value(v) -> str:
    """A hyperparameter in a table: blank where not applicable, floats to 3 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float | np.floating):
        return f"{v:.3g}"
    return str(v)


def amount(x) -> str:
    """A cost (seconds, hours, a parameter count): 3 significant digits, thousands separated from 1,000 up."""
    if not finite(x):
        return "–"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
