"""What the sweep's driver journals to log its best model (sweeps/journal.py, op "model"): the fields of
the op, the signature and the pinned requirements; and `load_images`, the model's input from image files.
The model's code is sweeps/model.py, a models-from-code file that only MLflow runs (it hands MLflow the
model as it is imported), so nothing here imports it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from cnnclf.data import decode_image, strict_decoding
from cnnclf.train import load_model

NAME = "model"  # the logged model's name: runs:/<parent run id>/model
CODE = Path(__file__).with_name("model.py").resolve()  # the model's code (sweeps/registry.py checks ops name it)
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")  # what the model imports, pinned as installed
METRIC_PREFIX = "best/"  # the parent run's metrics that the logged model carries too
CLASS_COLUMN = "class"  # the output column of the most probable class (sweeps/model.py's)


def signature(classes: list[str], size: int):
    """Input: one uint8 tensor (-1, size, size, 3); output: a float column per class and `class`."""

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))])
    outputs = Schema([*(ColSpec("float", c) for c in classes), ColSpec("string", CLASS_COLUMN)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Pinned to what is installed (a local version label such as +cu130 dropped), so that MLflow never
    infers requirements (which would load the model in a subprocess and may ask PyPI)."""
    return [f"{d}=={importlib.metadata.version(d).split('+')[0]}" for d in REQUIREMENTS]


def journal_op(checkpoint: Path, test_x, sweep: str, trial_id: str, register: str | None, source: str = "") -> dict:
    """The fields of the journal's "model" op for the checkpoint `best_model.pt`: everything it needs is in
    the op or in a file beside the checkpoint (the input example is written there), so a replay (`--sync`)
    logs the same model.

    `test_x`: uint8 (N, 3, S, S) test images; the first two are the input example (zeros when there are none)."""
    _, cfg, meta = load_model(checkpoint)
    size, classes = cfg.image_size, [str(c) for c in meta["classes"]]
    example = np.asarray(test_x[:2]).transpose(0, 2, 3, 1) if len(test_x) else np.zeros((0, size, size, 3))
    if example.shape[1:] != (size, size, 3) or len(example) == 0:
        example = np.zeros((1, size, size, 3))
    example_path = Path(checkpoint).parent / "model_input_example.npy"
    np.save(example_path, np.ascontiguousarray(example, dtype=np.uint8), allow_pickle=False)
    metadata = {
        "task": cfg.task,
        "classes": classes,
        "normalization": {"mean": [float(v) for v in meta["mean"]], "std": [float(v) for v in meta["std"]]},
        "image_size": size,
        "input": f"uint8 (N, {size}, {size}, 3) RGB, channels last",
        "output": f"DataFrame: a float32 probability column per class, and {CLASS_COLUMN!r} (the argmax)",
        "sweep": sweep,
        "trial_id": trial_id,  # the recommended configuration's search trial
        "source": source,  # which of its runs these weights are (the search trial or a confirmation run)
        "checkpoint": "best_model/best_model.pt on the parent run; read with torch.load(weights_only=True)",
    }
    return {
        "name": NAME,
        "code": str(CODE),
        "checkpoint": str(Path(checkpoint).resolve()),
        "digest": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),  # which weights: one model each
        "example": str(example_path.resolve()),
        "signature": signature(classes, size).to_dict(),
        "metadata": metadata,
        "requirements": requirements(),
        "params": {k: str(v) for k, v in cfg.to_dict().items() if k != "tags"},
        "model_type": "cnnclf-image-classifier",
        "metric_prefix": METRIC_PREFIX,
        "register": register,
    }


def load_images(paths, size: int) -> np.ndarray:
    """Image files as uint8 (N, size, size, 3) RGB, decoded and resized as `python -m cnnclf predict` does."""
    with strict_decoding():
        images = [decode_image(p, size) for p in paths]
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
