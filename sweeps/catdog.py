"""Sweep cnnclf on Cat/Dog with Ray Tune + Optuna (TPE) + ASHA; every trial lands in MLflow.

    python sweeps/catdog.py --num-samples 40 --data-dir data
    python sweeps/catdog.py --smoke-test --data-dir data          # 2 trials + baseline, 1 epoch, ~1 min on a CPU
    mlflow ui --backend-store-uri sqlite:///mlflow.db             # compare the runs

Search space (Optuna define-by-run; `--fix name=value` pins any of them):
    optimizer     {sgd, adam, adamw}
    lr            log-uniform, sgd [1e-3, 0.5], adam/adamw [1e-4, 1e-2]
    momentum      uniform [0.5, 0.99], sgd only
    amsgrad       {false, true}, adam/adamw only
    weight_decay  log-uniform [1e-6, 1e-2]
    batch_size    {10, 16, 32, 64, 128, 256}   (10: the seed's)
    depth         int [4, 8] conv layers
    kernel_size   {3, 5, 7}
    width         {8, 12, 16, 24} channels in the first stage
Fixed unless pinned: model cnn, 64x64 images (`--fix image_size=128` for the seed's 128),
cosine schedule with 1 warm-up epoch, label smoothing 0.1, Nesterov momentum for SGD, random
resized crop + flip, ImageNet mean/std, bf16 autocast where the device has bf16 units,
epochs = --max-epochs (default 15).
The search's first trial is the reference configuration: width 16, depth 6, 3x3 kernels,
batch 64, SGD lr 0.05, momentum 0.9, weight decay 5e-4. With --budget-by time (the default)
a trial may train twice the time the reference needs for those epochs here, measured at the
start. The seed baseline (5 convs 7x7, SGD lr 0.008, batch 10) runs in the same sweep on the
same splits and images, tagged role=baseline, for as many of its 60 epochs as fit in the
reference's time. Smoke test: 64x64 images.
"""

import sys

import reports
from cnnclf.config import PRESETS, SWEEP_BASES
from sweeps.cli import main
from sweeps.spec import Ranges, TaskSpec

SPEC = TaskSpec(
    task="catdog",
    base=SWEEP_BASES["catdog"],  # the reference configuration (cnnclf/config.py)
    baseline=PRESETS["catdog-seed"],
    ranges=Ranges(batch_size=(10, 16, 32, 64, 128, 256), depth=(4, 8), width=(8, 12, 16, 24)),
    smoke_ranges=Ranges.smoke(depth=(3, 4), width=(8,)),
    smoke_image_size=64,
    default_max_epochs=15,
    doc=__doc__,
)

if __name__ == "__main__":
    sys.exit(main(SPEC, report=reports.write))
