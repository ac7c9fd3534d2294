"""A run's pace, measured early: what `train`'s `probe` hands a cost guard (sweeps/budget.py, sweeps/trainable.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pace:
    """How fast a run trains, measured early (see `train`'s `probe`): what a cost guard projects from."""

    seconds: float  # the timed training steps so far in this process (compilation excluded)
    images: int  # the images those steps trained on
    images_left: int  # images the run has still to train on after them, to its last epoch
    spent: float  # training seconds of the run before this process (a resumed run), then this epoch's untimed start

    def projected_s(self, extra_s: float = 0.0) -> float:
        """The whole run's training seconds at this pace (`extra_s`: more seconds the timed steps took)."""
        seconds = self.seconds + extra_s
        return self.spent + seconds + self.images_left * seconds / max(1, self.images)


Probe = Callable[[Pace], None]
PROBE_STEPS, PROBE_S = 200, 20.0  # a run's pace is measured after this many timed steps, or seconds if sooner


def probe_due(timed_steps: int, t_timed: float) -> bool:
    return timed_steps >= PROBE_STEPS or (timed_steps % 8 == 0 and time.perf_counter() - t_timed >= PROBE_S)


def pace_now(device: torch.device, starts: tuple[float, float], images: int, left: int, cost: dict) -> Pace:
    """The run's Pace now: `images` trained since the timed start in an epoch (starts: its start, the timed
    start), `left` images still to train after them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, t_timed = starts
    return Pace(time.perf_counter() - t_timed, images, max(0, left), cost["cost/train_s"] + (t_timed - t0))
