"""The best model of a sweep as an MLflow pyfunc model (sweeps/model.py, the journal's "model" op).

A real smoke sweep (Ray Tune, Optuna, MLflow on SQLite) with --register-model, then: the parent run has
one logged model with a signature, an input example, the class names and the normalization; it loads
offline from its registered version, its model id and the run; and it predicts what
`python -m cnnclf predict --json` prints for the same files. Replaying the op logs nothing twice.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cnnclf.data import CIFAR10_CLASSES
from tests.conftest import REGISTERED_MODEL
from tests.test_sweeps import ROOT, sweep

REGISTERED = REGISTERED_MODEL
SWEEP = "smoke"


@pytest.fixture(scope="module")
def swept(smoke_sweep) -> dict:
    """The shared smoke sweep (tests/conftest.py, with --register-model); what the tests below look at."""
    tmp, data, r = smoke_sweep.tmp, smoke_sweep.data, smoke_sweep.result
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cifar10")
    parents = client.search_runs([exp.experiment_id], f"tags.sweep = '{SWEEP}' and tags.role = 'sweep'")
    assert len(parents) == 1
    files = sorted((data / "test").glob("*/0.png"))[:5] + sorted((data / "test").glob("*/1.png"))[5:8]
    return {"tmp": tmp, "uri": uri, "client": client, "exp": exp, "parent": parents[0], "files": files, "out": r.stdout}


@pytest.fixture
def tracking(swept):
    """The sweep's store as MLflow's global tracking (and registry) URI, for models:/ and runs:/ URIs."""
    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(swept["uri"])
    yield swept["uri"]
    mlflow.set_tracking_uri(before)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def logged_models(swept) -> list:
    run_id = swept["parent"].info.run_id
    return list(swept["client"].search_logged_models([swept["exp"].experiment_id], f"source_run_id = '{run_id}'"))


def cnnclf_predict(checkpoint: Path, files: list[Path]) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-m", "cnnclf", "predict", "--checkpoint", str(checkpoint), *map(str, files), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_parent_run_has_one_logged_model_with_signature_example_and_classes(swept, tracking):
    from mlflow.models import Model

    models = logged_models(swept)
    assert [m.name for m in models] == ["model"] and str(models[0].status) == "READY"
    model = models[0]
    assert model.tags["cnnclf.key"].startswith(f"{SWEEP}/sweep/model@")  # how a replay finds it (weights' digest)
    run = swept["client"].get_run(swept["parent"].info.run_id)
    assert model.model_id in [o.model_id for o in run.outputs.model_outputs]
    assert model.params["image_size"] == "32" and "lr" in model.params  # the best trial's configuration
    assert "best/val/acc" in {m.key for m in model.metrics}  # the sweep's headline, in the Models tab
    assert f"models:/{model.model_id}" in swept["out"] and f"models:/{REGISTERED}/1" in swept["out"]

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}"))
    info = Model.load(local)
    assert info.model_id == model.model_id and info.run_id == run.info.run_id
    inputs, outputs = info.signature.inputs, info.signature.outputs
    assert inputs.is_tensor_spec() and inputs.numpy_types() == [np.dtype(np.uint8)]
    assert inputs.inputs[0].shape == (-1, 32, 32, 3)
    assert outputs.input_names() == [*CIFAR10_CLASSES, "class"]
    meta = info.metadata
    assert meta["classes"] == CIFAR10_CLASSES and meta["image_size"] == 32
    assert len(meta["normalization"]["mean"]) == 3 and len(meta["normalization"]["std"]) == 3
    example = info.load_input_example(str(local))
    assert example.dtype == np.uint8 and example.shape[1:] == (32, 32, 3)
    # models from code: the code file and the weights, nothing pickled; requirements pinned, never inferred
    flavor = info.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and (local / "model.py").exists()
    assert flavor["artifacts"]["checkpoint"]["path"] == "artifacts/best_model.pt"
    assert (local / "artifacts" / "best_model.pt").exists()
    assert not list(local.rglob("*.pkl"))
    reqs = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "torch", "numpy", "pandas", "pillow"}
    # best_model.pt is kept, on disk and as the parent run's own artifact
    assert (swept["tmp"] / "out" / SWEEP / "best_model.pt").exists()
    assert [a.path for a in swept["client"].list_artifacts(run.info.run_id, "best_model")] == [
        "best_model/best_model.pt"
    ]


@pytest.mark.slow
def test_registered_and_run_models_predict_like_cnnclf_predict(swept, tracking, offline):
    from sweeps.logged_model import load_images

    expected = cnnclf_predict(swept["tmp"] / "out" / SWEEP / "best_model.pt", swept["files"])
    version = swept["client"].get_model_version(REGISTERED, "1")
    model_id = logged_models(swept)[0].model_id
    assert version.run_id == swept["parent"].info.run_id and version.source == f"models:/{model_id}"
    uris = [f"models:/{REGISTERED}/1", f"models:/{model_id}", f"runs:/{swept['parent'].info.run_id}/model"]
    for uri in uris:
        m = mlflow.pyfunc.load_model(uri)  # env_manager="local": this environment, no new one
        size = m.metadata.metadata["image_size"]
        out = m.predict(load_images(swept["files"], size))
        assert list(out.columns) == [*CIFAR10_CLASSES, "class"] and len(out) == len(expected)
        for (_, row), want in zip(out.iterrows(), expected, strict=True):
            assert row["class"] == want["class"], uri
            assert abs(row[want["class"]] - want["probability"]) <= 1e-5, uri
        probs = out[CIFAR10_CLASSES].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_predict_refuses_channels_first_and_wrong_dtype(swept, tracking, offline):
    from mlflow.exceptions import MlflowException

    m = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    good = np.zeros((2, 32, 32, 3), np.uint8)
    assert m.predict(good).shape == (2, 11)
    for bad in (np.zeros((2, 3, 32, 32), np.uint8), good.astype(np.float32)):
        with pytest.raises(MlflowException):
            m.predict(bad)


@pytest.mark.slow
def test_replaying_the_model_op_logs_and_registers_nothing_twice(swept):
    from sweeps.journal import Journal

    folder = swept["tmp"] / "out" / SWEEP / "journal"
    ops = [json.loads(line) for line in (folder / "ops.jsonl").read_text().splitlines()]
    (op,) = [o for o in ops if o["op"] == "model"]
    assert op["register"] == REGISTERED
    (model,) = logged_models(swept)
    journal = Journal(folder, swept["uri"], "cifar10", SWEEP, verbose=False)
    try:
        journal._apply(op)  # a replay of what was all done
        swept["client"].finalize_logged_model(model.model_id, "FAILED")  # as if cut short before its upload
        journal._apply(op)  # the same model is saved and uploaded again, and made READY
    finally:
        journal.close(timeout=0)
    assert [(m.model_id, str(m.status)) for m in logged_models(swept)] == [(model.model_id, "READY")]
    assert [str(v.version) for v in swept["client"].search_model_versions(f"name = '{REGISTERED}'")] == ["1"]
    run = swept["client"].get_run(swept["parent"].info.run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert journal.logged_models["model"] == model.model_id


def test_register_model_bad_name_exits_2_with_one_line(tmp_path):
    r = sweep("cifar10", tmp_path, "--no-download", "--register-model", "bad/name", timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--register-model" in lines[0] and "bad/name" in lines[0], r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()
