"""What every command line of the project shares (`python -m cnnclf`, the sweep scripts, `python -m
reports`): bad input is one line on stderr and exit 2, and the argument types that say why.

Standard library only, so a mistyped flag is answered before torch, Ray or MLflow is imported.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """Bad arguments or unusable input: exit 2 with this one-line message."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise UsageError(message)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first line (its type's name when it has no message)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[0].strip() if lines else type(e).__name__)[:limit]


def described(e: BaseException, limit: int = 200) -> str:
    """`Type: first line`, for notes about a failure that go on."""
    return f"{type(e).__name__}: {first_line(e, limit)}"


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def nonnegative_float(s: str) -> float:
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):  # NaN fails both comparisons; inf warm-up never ends
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


MAX_SEED = 2**31 - 1  # torch, numpy and Python all take it; the data's seeded offsets stay below 2**32


def seed(s: str) -> int:
    v = int(s)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED}, got {s}")
    return v


def path(s: str) -> Path:
    if not s.strip():  # Path("") is the working directory: never what an empty value meant
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(s)


positive_int.__name__ = "positive integer"  # argparse names the type in its message
positive_float.__name__ = "positive number"
nonnegative_float.__name__ = "number"
path.__name__ = "path"
seed.__name__ = "seed"
