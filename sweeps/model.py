"""A sweep's best model as an MLflow pyfunc model, logged from code (MLflow's "models from code").

MLflow copies this file into the logged model (`code/model.py`) and runs it when the model is loaded:
nothing is cloudpickled. The weights travel as the model's `checkpoint` artifact (the sweep's
`best_model.pt`) and are read by `cnnclf.train.load_model`, with `torch.load(weights_only=True)`.

    import mlflow
    m = mlflow.pyfunc.load_model("models:/<model_id>")      # or models:/<NAME>/<version>, runs:/<parent>/model
    probs = m.predict(images)                               # uint8 (N, S, S, 3) RGB -> DataFrame
    probs = m.predict(load_images(["a.jpg", "b.png"], m.metadata.metadata["image_size"]))  # sweeps.logged_model

`predict` takes a numpy uint8 array (N, S, S, 3) of RGB images at the model's image size S (the
signature's one tensor; channels-first arrays and file paths are refused by MLflow's schema check, so
decode files with `sweeps.logged_model.load_images`, which decodes them exactly as `python -m cnnclf predict` does). It
returns a DataFrame with one float32 column of probabilities per class name, in the model's class
order, and `class`, the most probable class name.

The model needs the `cnnclf` package (this project) importable where it is loaded; it is loaded in the
current environment (`env_manager="local"`, load_model's default), and nothing reaches the network.
Only MLflow runs this file (its last line hands MLflow the model): the sweep's driver never imports it,
and logs the model through its journal with sweeps/logged_model.py (op "model").
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from cnnclf.data import Normalizer
from cnnclf.train import load_model

CLASS_COLUMN = "class"  # sweeps/logged_model.py's signature names it too
BATCH = 512  # images per forward pass


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """uint8 (N, S, S, 3) RGB images -> class probabilities, as `python -m cnnclf predict` computes them."""

    def load_context(self, context) -> None:

        self.model, self.cfg, meta = load_model(context.artifacts["checkpoint"], "cpu")  # weights_only=True
        self.classes = [str(c) for c in meta["classes"]]
        self.normalize = Normalizer(meta["mean"], meta["std"], torch.device("cpu"))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # checked: the signature

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


mlflow.models.set_model(ImageClassifier())
