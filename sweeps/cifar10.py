"""Sweep cnnclf on CIFAR-10 with Ray Tune + Optuna (TPE) + ASHA; every trial lands in MLflow.

    python sweeps/cifar10.py --num-samples 40
    python sweeps/cifar10.py --smoke-test --data-dir data        # 2 trials + baseline, 1 epoch, ~1 min on a CPU
    mlflow ui --backend-store-uri sqlite:///mlflow.db             # compare the runs

Search space (Optuna define-by-run; `--fix name=value` pins any of them):
    optimizer     {sgd, adam, adamw}
    lr            log-uniform, sgd [1e-3, 0.5], adam/adamw [1e-4, 1e-2]
    momentum      uniform [0.5, 0.99], sgd only
    amsgrad       {false, true}, adam/adamw only
    weight_decay  log-uniform [1e-6, 1e-2]
    batch_size    {4, 16, 32, 64, 128, 256, 512}   (4: the seed's)
    depth         int [3, 8] conv layers
    kernel_size   {3, 5, 7}
    width         {16, 24, 32, 40} channels in the first stage
Fixed unless pinned: model cnn, cosine schedule with 1 warm-up epoch, label smoothing 0.1,
Nesterov momentum for SGD, crop+flip, the training split's own mean/std, bf16 autocast where
the device has bf16 units, epochs = --max-epochs (default 5).
The search's first trial is the reference configuration: width 32, depth 6, 3x3 kernels,
batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4. With --budget-by time (the default)
a trial may train twice the time the reference needs for those epochs here, measured at the
start. The seed baseline (tutorial net, Adam amsgrad lr 1e-3, batch 4, 2 epochs) runs in the
same sweep on the same splits, tagged role=baseline, for the epochs that fit in the
reference's time.
"""

import sys

import reports
from cnnclf.config import PRESETS, SWEEP_BASES
from sweeps.cli import main
from sweeps.spec import Ranges, TaskSpec

SPEC = TaskSpec(
    task="cifar10",
    base=SWEEP_BASES["cifar10"],  # the reference configuration (cnnclf/config.py)
    baseline=PRESETS["cifar10-seed"],
    ranges=Ranges(batch_size=(4, 16, 32, 64, 128, 256, 512), depth=(3, 8), width=(16, 24, 32, 40)),
    smoke_ranges=Ranges.smoke(depth=(2, 3), width=(8, 16)),
    smoke_image_size=32,
    default_max_epochs=5,
    doc=__doc__,
)

if __name__ == "__main__":
    sys.exit(main(SPEC, report=reports.write))
