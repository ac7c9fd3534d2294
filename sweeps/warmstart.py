"""`--warm-start NAME`: earlier sweeps' finished search trials, as prior knowledge for a new sweep's sampler.

    priors = load(["cifar10-a"], out, settings_of(base, fixed, ranges, load_kw))

Each sweep keeps its Optuna study in `<out>/<name>/optuna.db`; every search trial there carries the
settings it ran under (`settings`, user attribute, written by the searcher when the trial ends). A
new sweep copies the trials whose settings equal its own into its study, marked `warm_start`, so
TPE starts from them; they are not run again and not counted in `--num-samples`. The rest are left
out, counted, with the first differing setting. Trials an earlier sweep itself was warm-started
with are not copied again (only what a sweep ran is its knowledge), nor are trials whose value is
not a finite number or whose params lie outside their own recorded distributions (counted too).

A source study is only ever read: it is opened read-only (SQLite `mode=ro`), checked to be an SQLite
database holding an Optuna study of that name, and copied to a temporary file that Optuna opens, so
neither this code nor Optuna writes to it (Optuna would add its schema to another program's database).
An empty, corrupt or foreign file is UsageError: one line naming it (exit 2). `check` is the same test
without Optuna, for the command line to run before Ray starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from cnnclf.args import UsageError, first_line
from cnnclf.config import TrainConfig
from sweeps.spec import SEARCH_PARAMS, Ranges, finite

WARM_ATTR, SETTINGS_ATTR, STATUS_ATTR = "warm_start", "settings", "status"
STUDY_FILE = "optuna.db"
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
OPTUNA_TABLES = ("studies", "trials", "trial_params", "trial_values", "trial_user_attributes", "version_info")


def settings_of(base: TrainConfig, fixed: dict, ranges: Ranges, load: dict) -> dict:
    """What a search trial's val/acc depends on besides its searched values: every training field the
    search leaves alone (image size, epochs, augmentation, ...), the pinned search values (--fix), the
    search ranges and the data subset. Plain JSON values, so they compare after a round trip."""
    data_fields = ("subset", "eval_subset", "split_seed")  # recorded below, as sweeps before them did
    train = {k: v for k, v in base.to_dict().items() if k not in (*SEARCH_PARAMS, *data_fields, "seed", "tags", "task")}
    pinned = {k: v for k, v in fixed.items() if k in SEARCH_PARAMS}
    data = {k: load.get(k) for k in ("subset", "eval_subset")}
    return json.loads(json.dumps({"train": train, "fixed": pinned, "ranges": dataclasses.asdict(ranges), **data}))


@dataclass
class Priors:
    """What the named sweeps teach: Optuna trials to add, a record of each, and what was left out."""

    sources: list[str]
    trials: list = field(default_factory=list)  # optuna FrozenTrial, ready for study.add_trials
    records: list[dict] = field(default_factory=list)  # sweep, number, params, value, status
    left_out: list[dict] = field(default_factory=list)  # sweep, count, why

    def lines(self) -> list[str]:
        """What the driver prints: one line for what seeds the sampler, one per reason something was left out."""
        if not self.sources:
            return []
        per = {s: sum(r["sweep"] == s for r in self.records) for s in self.sources}
        used = ", ".join(f"{n} of sweep {s}" for s, n in per.items())
        out = [f"warm start: {used} seed the sampler (prior knowledge: not run again, not counted in --num-samples)"]
        for x in self.left_out:
            out.append(f"warm start: left out {x['count']} trial(s) of sweep {x['sweep']}: {x['why']}")
        return out

    def as_json(self) -> dict:
        return {"sources": self.sources, "trials": self.records, "left_out": self.left_out}


def study_path(out: Path, name: str) -> Path:
    return Path(out) / name / STUDY_FILE


def load(sources: list[str], out: Path, settings: dict) -> Priors:
    """The finished search trials of `sources` (their studies under `out`) whose settings equal `settings`."""
    priors = Priors(list(sources))
    for name in sources:
        reasons: dict[str, int] = {}
        for t in _finished(study_path(out, name), name):
            why = _unusable(t) or _difference(t.user_attrs.get(SETTINGS_ATTR), settings)
            if not why:
                try:
                    copied = _copy(t, name)
                except ValueError:  # create_trial checks each param against its distribution
                    why = "a param outside its own recorded distribution"
            if why:
                reasons[why] = reasons.get(why, 0) + 1
                continue
            priors.trials.append(copied)
            status = t.user_attrs.get(STATUS_ATTR, t.state.name.lower())
            record = {"sweep": name, "number": t.number, "params": t.params, "value": t.value, "status": status}
            priors.records.append(record)
        priors.left_out += [{"sweep": name, "count": n, "why": why} for why, n in reasons.items()]
    return priors


def check(path: Path, name: str) -> None:
    """UsageError (one line naming `path`) unless it is an SQLite database holding an Optuna study `name`.
    Reads it read-only and imports no Optuna: cheap enough for the command line's checks."""
    with _read_only(path, name):
        pass


def _error(path: Path, why: str) -> UsageError:
    return UsageError(f"argument --warm-start: {path} {why}")


@contextlib.contextmanager
def _read_only(path: Path, name: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to `path`, once it is known to hold an Optuna study named `name`."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise _error(path, f"cannot be read ({e.strerror})") from None
    if not magic:
        raise _error(path, "is empty, not an Optuna study")
    if magic != SQLITE_MAGIC:
        raise _error(path, "is not an SQLite database, so not an Optuna study")
    db = None
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        ok = db.execute("PRAGMA quick_check").fetchone()
        if not ok or ok[0] != "ok":
            raise _error(path, f"is a corrupt SQLite database ({ok[0] if ok else 'quick_check gave nothing'})")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in OPTUNA_TABLES if t not in tables]
        if missing:
            raise _error(path, f"is not an Optuna study (an SQLite database without the table {missing[0]})")
        if not db.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone():
            raise _error(path, f"holds no Optuna study named {name!r}")
        yield db
    except sqlite3.Error as e:
        raise _error(path, f"is not a readable SQLite database ({first_line(e)})") from None
    finally:
        if db is not None:
            db.close()


def _finished(path: Path, name: str) -> list:
    """The trials `name` ran itself and that ended (complete, pruned or failed), oldest first.

    Optuna reads a copy (SQLite's backup of the read-only source) in a temporary folder: whatever it
    writes (its schema, a migration, a lock) goes there, never into the source."""

    with tempfile.TemporaryDirectory(prefix="cnnclf-warm-start-") as tmp:
        copy = Path(tmp) / STUDY_FILE
        with _read_only(path, name) as source, contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)
            # A "finite" value that is NULL (SQLite stores NaN so) or text fails an assertion in Optuna's
            # reader, for the whole study: in the copy it becomes no value, and `_unusable` counts the trial.
            with contextlib.suppress(sqlite3.Error), target:
                finite = "value_type = 'FINITE' AND typeof({}) NOT IN ('real', 'integer')"
                target.execute(f"DELETE FROM trial_values WHERE {finite.format('value')}")
                target.execute(
                    "DELETE FROM trial_intermediate_values WHERE "
                    + finite.replace("value_type", "intermediate_value_type").format("intermediate_value")
                )
        storage = None
        try:
            storage = optuna.storages.RDBStorage(f"sqlite:///{copy}", skip_table_creation=True)
            study = optuna.load_study(study_name=name, storage=storage)
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
            return [t for t in study.get_trials(deepcopy=False, states=states) if WARM_ATTR not in t.user_attrs]
        except Exception as e:  # a schema of another Optuna version, unreadable rows, JSON nested too deep
            why = f"cannot be read as an Optuna {optuna.__version__} study ({type(e).__name__}: {first_line(e, 160)})"
            raise _error(path, why) from None
        finally:
            if storage is not None:
                storage.remove_session()
                storage.engine.dispose()


def _unusable(t) -> str | None:
    """Why a finished trial cannot seed the sampler whatever its settings; None when it can."""

    if t.state == optuna.trial.TrialState.COMPLETE and not finite(t.value):
        return "a value that is not a finite number"
    theirs = t.user_attrs.get(SETTINGS_ATTR)
    if theirs is not None and not isinstance(theirs, dict):
        return "an unreadable record of the settings they ran under"
    return None


def _difference(theirs: dict | None, ours: dict) -> str | None:
    """None when a trial ran under our settings; else why not, in a few words."""
    if theirs is None:
        return "no record of the settings they ran under (a sweep from before --warm-start)"
    diffs = []
    for part in ("train", "fixed", "ranges", "subset", "eval_subset"):
        a, b = theirs.get(part), ours.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) | set(b), key=str)
            diffs += [f"{k} {_v(a.get(k))} vs {_v(b.get(k))}" for k in keys if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{part} {_v(a)} vs {_v(b)}")
    return "fixed settings differ: " + ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else "") if diffs else None


def _v(x) -> str:
    return "unset" if x is None else str(x)


def _copy(t, sweep: str):
    """A new trial with the same values, distributions, value and state, marked as prior knowledge."""

    return optuna.trial.create_trial(
        state=t.state,
        value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
        params=t.params,
        distributions=t.distributions,
        user_attrs={**t.user_attrs, WARM_ATTR: {"sweep": sweep, "number": t.number}},
        intermediate_values=t.intermediate_values,
    )
