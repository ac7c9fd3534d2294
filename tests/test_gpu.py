"""The GPU path (`-m gpu`): skipped without CUDA (tests/conftest.py), run on the device machine.

That machine has torch, torchvision, numpy, PIL, tqdm and pytest but no Ray, Optuna or MLflow, so
this file and tests/test_train.py import none of them at module level. Run them there with

    PYTHONPATH=. python -m pytest -m gpu tests/test_gpu.py tests/test_train.py

(not over the whole tests/ folder: other modules import MLflow and Ray at collection).
benchmarks/device_check.sh runs exactly that before benchmarks/gpu.py. With CNNCLF_CIFAR10_DIR
pointing at real CIFAR-10 (any layout cnnclf reads), the accuracy-band test uses it; without,
small synthetic data. The last test, not GPU-marked, keeps that promise on every CI run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnclf.config import PRESETS, TrainConfig
from cnnclf.data import CIFAR10_CLASSES, TaskData, load_task, make_augment
from cnnclf.train import train
from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "optuna", "mlflow")

# Python that makes importing Ray, Optuna or MLflow fail, as on the device machine; then runs argv.
BLOCK_HEAVY = f"""
import importlib.abc, runpy, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not installed on the device machine")
sys.meta_path.insert(0, _Absent())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_without_heavy(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` with Ray, Optuna and MLflow made unimportable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY, module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


# The accuracy-band config: a sweep-like trial (sweeps/cifar10.py's base), small enough for a CPU.
BAND = TrainConfig(
    task="cifar10",
    model="cnn",
    depth=4,
    width=32,
    batch_size=128,
    epochs=3,
    schedule="cosine",
    warmup_epochs=1,
    augment="crop-flip",
    normalize="dataset",
    subset=10_000,
)
BAND_TOLERANCE = 0.04  # |test/acc on CUDA - test/acc on the CPU|: seeds alone move it about 1%


def _synthetic(n_train: int = 256, n_eval: int = 64) -> TaskData:
    from tests.test_train import synthetic

    return synthetic(n_train=n_train, n_eval=n_eval)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> Path:
    real = os.environ.get("CNNCLF_CIFAR10_DIR")
    if real:
        return Path(real)
    return write_cifar_folders(tmp_path_factory.mktemp("gpu") / "cifar10", n_train=40, n_test=10)


@pytest.mark.gpu
def test_cifar10_on_cuda_lands_in_the_cpu_band(cifar10_dir):
    cfg = BAND if os.environ.get("CNNCLF_CIFAR10_DIR") else BAND.replace(subset=None, batch_size=32)
    data = load_task("cifar10", cifar10_dir, subset=cfg.subset, download_missing=False, progress=False)
    cpu = train(cfg, data, device="cpu")
    cuda = train(cfg, data, device="cuda")  # compile auto: compiled, CUDA graphs, bf16, channels_last
    print(
        f"\naccuracy band ({len(data.train_y)} train images): cpu test/acc {cpu['test/acc']:.4f} "
        f"({cpu['throughput/train_img_s']:.0f} img/s), cuda {cuda['test/acc']:.4f} "
        f"({cuda['throughput/train_img_s']:.0f} img/s, {cuda['compile_mode']}, compile {cuda['time/compile_s']:.1f} s)"
    )
    assert cuda["status"] == cpu["status"] == "completed"
    assert cuda["compile_mode"] == "reduce-overhead" and cpu["compile_mode"] is None
    assert abs(cuda["test/acc"] - cpu["test/acc"]) <= BAND_TOLERANCE
    if os.environ.get("CNNCLF_CIFAR10_DIR"):
        assert cpu["test/acc"] > 0.5  # on real CIFAR-10 the CPU run reached 0.570 and 0.554 (seeds 0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["none", "crop-flip", "resized-crop-flip"])
def test_on_device_augmentation_matches_the_cpu_in_shape_and_statistics(kind):
    """Different random streams, so not the same pixels: the same shapes, dtypes, and per-channel and
    per-position means (flips and crop offsets drawn from the same distributions)."""
    from cnnclf.data import Normalizer

    n, s = 4096, 32
    ramp = torch.linspace(0, 255, s).round().to(torch.uint8)  # left-right ramp: flips and shifts show
    x = torch.stack([ramp.expand(s, s), ramp.expand(s, s).T, torch.full((s, s), 90, dtype=torch.uint8)])
    x = x.expand(n, 3, s, s).contiguous()
    out = {}
    for dev in ("cpu", "cuda"):
        norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device(dev))
        g = torch.Generator(device=dev).manual_seed(0)
        a = make_augment(kind)(norm(x.to(dev)), g)
        g2 = torch.Generator(device=dev).manual_seed(0)
        assert torch.equal(a, make_augment(kind)(norm(x.to(dev)), g2))  # seeded: resume redraws the same
        assert a.shape == (n, 3, s, s) and a.dtype == torch.float32 and a.device.type == dev
        out[dev] = a.cpu()
    cpu, cuda = out["cpu"], out["cuda"]
    if kind == "none":
        assert torch.allclose(cpu, cuda, atol=1e-5)
        return
    assert torch.allclose(cpu.mean(dim=(0, 2, 3)), cuda.mean(dim=(0, 2, 3)), atol=0.03)
    assert torch.allclose(cpu.std(dim=(0, 2, 3)), cuda.std(dim=(0, 2, 3)), atol=0.03)
    assert torch.allclose(cpu.mean(0), cuda.mean(0), atol=0.15)  # per-position: 4096 draws each
    flipped = (cuda[:, 0, 0, 0] > cuda[:, 0, 0, -1]).float().mean().item()  # the ramp runs right-to-left
    assert 0.45 < flipped < 0.55


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["auto", "off"])
def test_resume_on_cuda_gives_the_uninterrupted_result(tmp_path, compile):
    from tests.test_train import small_cfg

    data = _synthetic(n_train=250)  # ragged: compiled runs drop 26 images an epoch
    cfg = small_cfg(epochs=3, schedule="cosine", warmup_epochs=1, augment="crop-flip", compile=compile)
    full = train(cfg, data, device="cuda")
    ckpt = tmp_path / "epoch1.pt"

    def stop_after_first(epoch, metrics, save):
        if epoch == 1:
            save(ckpt)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, stop_after_first, device="cuda")
    resumed = train(cfg, data, device="cuda", resume=ckpt)
    assert resumed["compile_mode"] == full["compile_mode"] == ("reduce-overhead" if compile == "auto" else None)
    # cuDNN's default algorithms may sum in any order, so not bit-exact as on the CPU.
    for k in ("train/loss", "val/loss"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-2, abs=1e-3), k
    for k in ("val/acc", "test/acc"):
        assert resumed[k] == pytest.approx(full[k], abs=0.03), k


@pytest.mark.gpu
@pytest.mark.parametrize("compile", ["auto", "off"])
def test_injected_out_of_memory_frees_device_memory(compile):
    """sweeps.trainable.train_or_oom imports only torch and cnnclf: no Ray needed here."""
    from sweeps.trainable import train_or_oom

    x = torch.randint(0, 255, (512, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(512) % 10
    data = TaskData("cifar10", CIFAR10_CLASSES, x, y, x, y, x, y).to("cuda")
    cfg = PRESETS["cifar10-strong"].replace(epochs=1, compile=compile)
    # One run that ends normally first: cuBLAS/cuDNN workspaces and handles stay for the process.
    assert train_or_oom(cfg, data, lambda *a: None, device="cuda") is None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    def report(epoch, metrics, save):
        raise torch.OutOfMemoryError("injected")

    failure = train_or_oom(cfg, data, report, device="cuda")
    assert failure["failure"] == "oom" and "injected" in failure["error"]
    assert torch.cuda.memory_allocated() == before  # model, optimizer, activations and CUDA graphs are gone
    assert train_or_oom(cfg, data, lambda *a: None, device="cuda") is None  # the next trial trains
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
def test_four_training_processes_share_one_gpu(tmp_path):
    """What `--gpus-per-trial 0.25` does: four trials at once on one GPU, each its own process."""
    root = write_cifar_folders(tmp_path / "cifar10", n_train=30, n_test=5)
    load_task("cifar10", root, download_missing=False, progress=False)  # decode once; the four read the cache
    cfg = TrainConfig(task="cifar10", model="cnn", depth=3, width=16, batch_size=32, epochs=3, lr=5e-3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    cmd = [sys.executable, "-m", "cnnclf", "train", *cfg.cli_args(), "--data-dir", str(root)]
    cmd += ["--device", "cuda", "--no-download", "--json"]
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for seed in range(4)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["status"] == "completed" and result["compile_mode"] == "reduce-overhead"


def test_device_test_files_collect_without_ray_optuna_or_mlflow():
    """The `gpu` tests must run where Ray, Optuna and MLflow are not installed (the device machine)."""
    files = ("tests/test_gpu.py", "tests/test_train.py")
    r = run_without_heavy("pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = r.stdout
    r = run_without_heavy("sweeps.trainable")  # the OOM test's import
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "test_cifar10_on_cuda_lands_in_the_cpu_band",
        "test_resume_on_cuda_gives_the_uninterrupted_result",
        "test_injected_out_of_memory_frees_device_memory",
        "test_four_training_processes_share_one_gpu",
        "test_cuda_bf16_channels_last_trains",
    ):
        assert name in collected, name
