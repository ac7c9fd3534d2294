"""A sweep's best model as an MLflow pyfunc model, logged from code (MLflow's "models from code").

MLflow copies this file into the logged model (`code/model.py`) and runs it when the model is loaded:
nothing is cloudpickled. The weights travel as the model's `checkpoint` artifact (the sweep's
`best_model.pt`) and are read by `cnnclf.train.load_model`, with `torch.load(weights_only=True)`.

    import mlflow
    m = mlflow.pyfunc.load_model("models:/<model_id>")      # or models:/<NAME>/<version>, runs:/<parent>/model
    probs = m.predict(images)                               # uint8 (N, S, S, 3) RGB -> DataFrame
    probs = m.predict(load_images(["a.jpg", "b.png"], m.metadata.metadata["image_size"]))

`predict` takes a numpy uint8 array (N, S, S, 3) of RGB images at the model's image size S (the
signature's one tensor; channels-first arrays and file paths are refused by MLflow's schema check, so
decode files with `load_images`, which decodes them exactly as `python -m cnnclf predict` does). It
returns a DataFrame with one float32 column of probabilities per class name, in the model's class
order, and `class`, the most probable class name.

The model needs the `cnnclf` package (this project) importable where it is loaded; it is loaded in the
current environment (`env_manager="local"`, load_model's default), and nothing reaches the network.
The rest of this module (`journal_op` and its helpers) is what the sweep's driver uses to log the model
through its journal (sweeps/journal.py, op "model"); MLflow runs it too, which only defines functions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np

NAME = "model"  # the logged model's name: runs:/<parent run id>/model
CODE = Path(__file__).resolve()  # this file: the model's code
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")  # what the model imports, pinned as installed
METRIC_PREFIX = "best/"  # the parent run's metrics that the logged model carries too
CLASS_COLUMN = "class"
BATCH = 512  # images per forward pass


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """uint8 (N, S, S, 3) RGB images -> class probabilities, as `python -m cnnclf predict` computes them."""

    def load_context(self, context) -> None:
        import torch

        from cnnclf.data import Normalizer
        from cnnclf.train import load_model

        self.model, self.cfg, meta = load_model(context.artifacts["checkpoint"], "cpu")  # weights_only=True
        self.classes = [str(c) for c in meta["classes"]]
        self.normalize = Normalizer(meta["mean"], meta["std"], torch.device("cpu"))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # checked: the signature
        import pandas as pd
        import torch

        images = check_images(model_input, self.cfg.image_size)
        parts = []
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                x = torch.from_numpy(images[i : i + BATCH]).permute(0, 3, 1, 2)  # NHWC -> NCHW, as predict does
                parts.append(torch.softmax(self.model(self.normalize(x)).float(), dim=1))
        probs = torch.cat(parts).numpy() if parts else np.zeros((0, len(self.classes)), np.float32)
        out = pd.DataFrame(probs, columns=self.classes)
        out[CLASS_COLUMN] = [self.classes[k] for k in probs.argmax(axis=1)] if len(probs) else []
        return out


def check_images(x, size: int) -> np.ndarray:
    """`x` as a contiguous uint8 (N, size, size, 3) array; ValueError naming what is wrong otherwise."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"expected a numpy array of images, uint8 (N, {size}, {size}, 3); got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0-255); got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(f"expected images of shape (N, {size}, {size}, 3), RGB channels last; got {x.shape}")
    return np.ascontiguousarray(x)


def load_images(paths, size: int) -> np.ndarray:
    """Image files as uint8 (N, size, size, 3) RGB, decoded and resized as `python -m cnnclf predict` does."""
    from cnnclf.data import decode_image, strict_decoding

    with strict_decoding():
        images = [decode_image(p, size) for p in paths]
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


mlflow.models.set_model(ImageClassifier())


# --- what the driver journals (sweeps/finish.py -> sweeps/journal.py, op "model") ---------------


def signature(classes: list[str], size: int):
    """Input: one uint8 tensor (-1, size, size, 3); output: a float column per class and `class`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))])
    outputs = Schema([*(ColSpec("float", c) for c in classes), ColSpec("string", CLASS_COLUMN)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Pinned to what is installed (a local version label such as +cu130 dropped), so that MLflow never
    infers requirements (which would load the model in a subprocess and may ask PyPI)."""
    return [f"{d}=={importlib.metadata.version(d).split('+')[0]}" for d in REQUIREMENTS]


def journal_op(
    checkpoint: Path, test_x, out_dir: Path, sweep: str, trial_id: str, register: str | None, source: str = ""
) -> dict:
    """The fields of the journal's "model" op for the checkpoint `best_model.pt`: everything it needs is in
    the op or in a file beside the checkpoint, so a replay (`--sync`) logs the same model.

    `test_x`: uint8 (N, 3, S, S) test images; the first two are the input example (zeros when there are none)."""
    from cnnclf.train import load_model

    _, cfg, meta = load_model(checkpoint)
    size, classes = cfg.image_size, [str(c) for c in meta["classes"]]
    example = np.asarray(test_x[:2]).transpose(0, 2, 3, 1) if len(test_x) else np.zeros((0, size, size, 3))
    if example.shape[1:] != (size, size, 3) or len(example) == 0:
        example = np.zeros((1, size, size, 3))
    example_path = out_dir / "model_input_example.npy"
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
