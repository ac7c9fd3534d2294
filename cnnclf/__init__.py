"""cnnclf: train small CNNs on CIFAR-10 and Cat/Dog, fast; no Ray, Optuna or MLflow here."""

__version__ = "0.1.0"
