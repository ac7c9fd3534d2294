"""The end of a sweep on the console: the top trials' table, the confirmations and the answer with its
evidence, and where the logged model is."""

from __future__ import annotations

from sweeps.rows import Row
from sweeps.spec import SEARCH_PARAMS, Answer, finite


def print_table(ranked: list[Row], base_row: Row | None, outcomes: dict) -> None:
    print(f"\n{'trial':>10s} {'role':8s} {'val/acc':>7s} {'test/acc':>8s} {'epochs':>6s}  config")
    for r in ranked[:5]:
        print(_fmt(r))
    if base_row is not None:
        print(_fmt(base_row))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))


def print_answer(ans: Answer, best: dict) -> None:
    """The answer on the console: the confirmations, then the recommended configuration and its evidence."""
    for c in ans.ranking:
        flag = f"  [{c.flag}]" if c.flag else ""
        print(f"confirmed {c.trial.trial_id}: test/acc {c.test.text()}; val/acc {c.val.text()}{flag}")
    if ans.reordered:
        print(
            f"confirmation reordered the search: {ans.trial.trial_id} (search #{ans.search_rank}) has the best mean "
            f"val/acc over fresh seeds, not the search's best {ans.search_top.trial_id}"
        )
    print(f"recommended: {ans.trial.trial_id}, {best['why']}")
    print(f"  test/acc {ans.test.text()}")
    if ans.flag:
        print(f"  warning: {ans.flag}")
    if best["runner_up"]:
        print(f"  vs runner-up {best['runner_up']['trial_id']}: {best['runner_up']['difference']['text']}")
    if best["baseline"] and best["baseline"]["difference"]:
        b = best["baseline"]
        print(f"  vs the baseline re-measured here ({b['test']['text']}): {b['difference']['text']}")
    doc = best["documented"]
    if doc and finite(ans.test.mean):
        differs = doc["budget_differs"]
        budget = f" (another budget: {', '.join(differs)})" if differs else " (the same budget)"
        print(f"  vs the documented {doc['test/acc']:.0%}{budget}: {100 * (ans.test.mean - doc['test/acc']):+.2f} pts")
    given = best["command_gives"]["test/acc"]
    gives = f"{given:.2%}" if finite(given) else "-"
    print(f"reproduce: {best['command']}\n  (its search trial {ans.trial.trial_id}; it gave test/acc {gives}", end="")
    threads = best["command_threads"]
    print(f"; exactly with OMP_NUM_THREADS={threads}, its CPU threads)" if threads else ")")
    print(f"model: {best['model']['source']}")


def print_model(journal, register: str | None) -> None:
    """Where the logged model is, once the journal has written it."""
    model_id = journal.logged_models.get("model")
    if model_id is None:
        return
    print(f"MLflow: the best model models:/{model_id} (mlflow.pyfunc.load_model; docs/tracking.md)", flush=True)
    if register in journal.registered:
        print(f"MLflow: registered as models:/{register}/{journal.registered[register]}", flush=True)


def _fmt(r: Row) -> str:
    c = r.cfg
    hp = []
    for k in SEARCH_PARAMS:
        if (k == "momentum" and c.optimizer != "sgd") or (k == "amsgrad" and c.optimizer == "sgd"):
            continue
        v = getattr(c, k)
        hp.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    va = f"{r.val_acc:.4f}" if r.val_acc is not None else "-"
    te = f"{r.test_acc:.4f}" if r.test_acc is not None else "-"
    model = "" if c.model == "cnn" else f" model={c.model}"
    return f"{r.trial_id:>10s} {r.role:8s} {va:>7s} {te:>8s} {r.epochs!s:>6s}  {' '.join(hp)}{model}"
