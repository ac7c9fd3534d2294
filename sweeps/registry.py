"""Logging the best model through the journal (its "model" op): a pyfunc model from code, once per
run however often the op is replayed, and its registered version.

`j` is the sweep's Journal (sweeps/journal.py), which calls in here; its client, sweep name, experiment
and the in-process record of what it logged and registered.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature

from cnnclf.args import described

CODE = Path(__file__).with_name("model.py").resolve()  # the only code a "model" op logs, whatever the op names
# What sweeps/model.py imports (its REQUIREMENTS), pinned: anything else in an op is refused, since a model's
# requirements are installed wherever it is served in an environment of its own (`--env-manager virtualenv`).
REQUIREMENT = re.compile(r"(mlflow|torch|numpy|pandas|pillow)==[0-9][0-9A-Za-z.]*")


def log_model(j, run_id: str, op: dict) -> None:
    """Log sweeps/model.py (`CODE`, a models-from-code file) with op["checkpoint"] on run `run_id` as a LoggedModel,
    and register it under op["register"]. The model carries a `cnnclf.key` tag (with op["digest"], the
    checkpoint's), so a replay finds it and only does what is missing: never a second model of the same
    weights on the run, nor a second registered version of it.

    The steps are mlflow.pyfunc.log_model's (MLflow's Model.log), made through this journal's client, so
    with its tracking URI and the run's experiment and no active run: create the LoggedModel, link it to
    the run as an output, save the model locally, load it back and predict the input example, upload,
    finalize."""

    c, exp = j.client, j.experiment_id_now()
    marker = f"{j.sweep}/{op['key']}/{op['name']}" + (f"@{op['digest'][:16]}" if op.get("digest") else "")
    found = [
        m
        for m in c.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
        if m.tags.get("cnnclf.key") == marker
    ]
    ready = [m for m in found if str(m.status) == str(LoggedModelStatus.READY)]
    model = (ready or found or [None])[0]
    if model is None:
        model = c.create_logged_model(
            exp,
            name=op["name"],
            source_run_id=run_id,
            tags={"cnnclf.key": marker, "sweep": j.sweep},
            params=op.get("params"),
            model_type=op.get("model_type"),
        )
    run = c.get_run(run_id)
    if model.model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
        c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if not ready:
        _save_and_upload(j, model, run_id, op)
    prefix = op.get("metric_prefix")
    if prefix:  # the run's headline metrics on the model too (the Models tab's columns); repeats merge
        latest = [c.get_metric_history(run_id, k)[-1:] for k in run.data.metrics if k.startswith(prefix)]
        metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for ms in latest for m in ms]
        if metrics:
            c.log_batch(run_id, metrics=metrics)
    if op.get("register"):
        _register(j, op["register"], model, run_id)
    j.logged_models[op["name"]] = model.model_id


def _register(j, name: str, model, run_id: str) -> None:
    """A version of registered model `name` whose source is `models:/<model_id>` (the UI then links the
    LoggedModel), unless one exists."""

    c, source = j.client, f"models:/{model.model_id}"
    try:
        c.create_registered_model(name, description=f"cnnclf: best models of sweeps ({j.experiment})")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = [v for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if v.source == source]
    if versions:
        j.registered[name] = str(versions[0].version)
        _link_version(j, model.model_id, name, j.registered[name])
    else:
        # A database store resolves a models:/ source with MLflow's *global* client (a TODO in MLflow),
        # so point it at this store for the call; a server resolves it itself.
        before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(j.tracking_uri)
        try:
            version = c.create_model_version(name, source, run_id=run_id, model_id=model.model_id)
            j.registered[name] = str(version.version)
        finally:
            mlflow.set_tracking_uri(before)
        _link_version(j, model.model_id, name, j.registered[name])


def _link_version(j, model_id: str, name: str, version: str) -> None:
    """The logged model's `mlflow.modelVersions` tag, which the UI's Models tab reads for its Registered
    models column (`mlflow.register_model` sets it; `create_model_version` does not)."""
    model = j.client.get_logged_model(model_id)
    linked = json.loads(model.tags.get("mlflow.modelVersions", "[]"))
    if {"name": name, "version": version} not in [{k: str(v) for k, v in x.items()} for x in linked]:
        linked.append({"name": name, "version": version})
        j.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(linked)})


def _save_and_upload(j, model, run_id: str, op: dict) -> None:
    """Save the model locally, load it back and predict its input example, upload it, mark it READY."""

    c = j.client
    with tempfile.TemporaryDirectory(prefix="cnnclf-model-") as tmp:
        local = Path(tmp) / "model"
        try:  # local work: a failure here is a bug or a missing file, never an outage to retry
            example = np.load(op["example"], allow_pickle=False)
            info = Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_uuid=model.model_id,
                model_id=model.model_id,
            )
            mlflow.pyfunc.save_model(
                str(local),
                python_model=str(CODE),  # never a file the op names (the journal refuses such an op)
                artifacts={"checkpoint": op["checkpoint"]},
                signature=ModelSignature.from_dict(op["signature"]),
                input_example=example,
                pip_requirements=op["requirements"],
                metadata=op["metadata"],
                mlflow_model=info,
            )
            mlflow.pyfunc.load_model(str(local)).predict(example)
        except Exception as e:
            raise RuntimeError(f"the model could not be saved: {described(e)}") from e
        c.log_model_artifacts(model.model_id, str(local))
    c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
