"""`--resume`: restore a sweep's Tuner from its own storage path, or rebuild it from the journal when
Tune's state was cut short; and adopt the trials that began after Tune's last snapshot.

Off the normal path: a fresh sweep calls `adopt` only, which finds nothing to adopt. What is
unpickled here (Tune's `tuner.pkl`, searcher state) comes from the sweep's own storage path only
(docs/security.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
from ray import tune

from sweeps.journal import SWEEP_KEY
from sweeps.spec import META_KEYS


@dataclass
class Orphan:
    trial_id: str
    role: str
    config: dict  # its Tune config, without meta keys
    dirs: list[str]  # its storage folder and those of trials that already continued it
    ended: bool = False  # it had ended (ASHA-stopped, say): replay its last result, train no further


@dataclass
class Orphans:
    """Trials the journal knows but Tune's restored state does not: they began after Tune's last
    snapshot before the driver went down. The searchers hand their configurations out again,
    first, each with `adopt` set, so the new trial continues the old one (its checkpoints, its
    MLflow run) instead of running it a second time."""

    entries: list[Orphan] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    enqueued: set[str] = field(default_factory=set)

    @classmethod
    def from_journal(cls, journal, known: set[str], experiment_path: str, roles: tuple[str, ...]) -> Orphans:
        entries, name = [], Path(experiment_path).name
        for t in journal.trials.values():
            role = t.config.get("role", "trial")
            if role not in roles or t.trial_id in known or any(a in known for a in t.adopted_by):
                continue
            # Entries from before extensions say no experiment: the first search, or the first confirmation.
            if (t.experiment or (journal.sweep if role != "confirm" else f"{journal.sweep}-confirm")) != name:
                continue  # another Tuner's trial (an earlier search of an extended sweep)
            ids = [t.trial_id, *t.adopted_by]
            dirs = [str(Path(experiment_path) / f"{role}-{i}") for i in ids] if "://" not in experiment_path else []
            entries.append(Orphan(t.trial_id, role, _strip(t.config), dirs, ended=t.status is not None))
        return cls(entries)

    def unclaimed(self, role: str) -> list[Orphan]:
        return [o for o in self.entries if o.role == role and o.trial_id not in self.claimed]

    def claim(self, config: dict) -> dict:
        """`config`, with `adopt` added when it is an orphan's configuration."""
        plain = _strip(config)
        for o in self.entries:
            if o.trial_id not in self.claimed and o.config == plain:
                self.claimed.add(o.trial_id)
                return {**config, "adopt": {"trial_id": o.trial_id, "dirs": o.dirs, "ended": o.ended}}
        return config


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in META_KEYS or k == "role"}


def adopt(ctx, experiment: str, path: str, known: set[str], roles: tuple[str, ...]) -> Orphans:
    """Hand the orphans of `experiment` (run at `path`) to its searcher, through the sweep's context
    (sweeps/context.py), to be handed out again first."""
    orphans = Orphans.from_journal(ctx.journal, known, path, roles)
    if orphans.entries:
        print(f"{len(orphans.entries)} trial(s) began after Tune's last snapshot; they continue where they were")
    ctx.orphans[experiment] = orphans
    return orphans


def restore(path: str, trainable, study: Path | None = None):
    """(Tuner, ids of the trials it knows) restored from `path`; (None, set()) when Tune's state there is
    missing or was cut short: it is then set aside (with the Optuna study) and the caller starts afresh."""

    if can_restore(path):
        print(f"resuming {Path(path).name} from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        return tuner, known_trials(tuner)
    set_aside(path, study)
    print(
        f"resuming {Path(path).name}: Tune's saved state is missing or was cut short; continuing from the "
        "sweep's journal",
        flush=True,
    )
    return None, set()


def can_restore(path: str) -> bool:
    """Whether Tune can restore the experiment at `path`: its state files exist and read back whole.

    Tune writes and copies those files in place, so a driver killed at the wrong moment leaves
    one truncated, and Tune's own fallback then silently starts the experiment over. A local
    experiment with such a file is not restorable; the sweep continues from its journal instead.
    """

    try:
        if not tune.Tuner.can_restore(path):
            return False
    except Exception:
        return False
    if "://" in path:
        return True

    folder = Path(path)
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        if not states:
            return False
        json.loads(states[-1].read_text())
        for f in [folder / "tuner.pkl", *folder.glob("searcher-state-*.pkl")]:
            with open(f, "rb") as fh:
                cloudpickle.load(fh)  # the sweep's own storage path: trusted, as Tune's own restore assumes
    except Exception:
        return False
    return True


def set_aside(path: str, study: Path | None) -> None:
    """Rename a cut-short Tune state (and the study its searcher wrote to) out of the way, so a fresh
    Tuner starts clean beside the trial folders; the journal re-enqueues what those trials were."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if study is not None and study.exists():
        study.rename(study.with_name(f"{study.name}.unreadable-{stamp}"))
    folder = Path(path)
    if "://" in path or not folder.is_dir():
        return
    for pattern in ("experiment_state-*.json", "searcher-state-*.pkl", "tuner.pkl", "basic-variant-state-*.json"):
        for f in folder.glob(pattern):
            f.rename(f.with_name(f"{f.name}.unreadable-{stamp}"))


def known_trials(tuner) -> set[str]:
    """Trial ids in Tune's restored state (trial folders are named <role>-<trial_id>)."""
    try:
        return {Path(str(r.path)).name.rsplit("-", 1)[-1] for r in tuner.get_results()}
    except Exception:
        return set()


# --- extending a finished sweep: more search Tuners on the same study and MLflow parent -----------


def phases(journal, name: str, num_samples: int) -> list[int]:
    """Search trials per Tuner: [--num-samples] for a new sweep; `--resume` with a larger --num-samples
    adds a Tuner for the difference (same study, same MLflow parent). Kept in the journal."""
    out = list(journal.meta.get("phases") or [num_samples])
    if num_samples > sum(out):
        print(f"extending {name}: {num_samples - sum(out)} more search trials (--num-samples {num_samples})")
        out.append(num_samples - sum(out))
    if out != journal.meta.get("phases"):
        journal.append("meta", data={"phases": out})
        if len(out) > 1:  # the parent's sweep.num_samples param stays the first; this tag has them all
            journal.append("log", SWEEP_KEY, tags=[["search.phases", "+".join(map(str, out))]])
    return out


def phase_path(path: str, i: int) -> str:
    """Where search Tuner `i` of the sweep at `path` runs: the first at `path`, extensions beside it."""
    return path if i == 0 else f"{path}-more{i}"


def confirm_path(path: str, phases: int) -> str:
    """The confirmation Tuner after `phases` searches: `-confirm` first, `-confirm2`... after extensions."""
    return f"{path}-confirm" if phases == 1 else f"{path}-confirm{phases}"


def began(path: str) -> bool:
    """Whether a Tuner (of an extension, or a later confirmation) was started at `path` before."""
    return can_restore(path) or ("://" not in path and Path(path).is_dir())
