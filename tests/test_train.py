from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from cnnclf.config import PRESETS, ConfigError, TrainConfig
from cnnclf.data import Normalizer, TaskData
from cnnclf.train import evaluate, load_model, lr_factor, train
from tests.conftest import class_image

METRICS = {"train/loss", "train/acc", "val/loss", "val/acc", "epoch", "time/epoch_s", "throughput/train_img_s"}


def synthetic(n_train=400, n_eval=100, classes=4, size=32, seed=0) -> TaskData:
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(n):
        y = torch.arange(n) % classes
        x = torch.stack([torch.from_numpy(class_image(int(c), classes, (size, size), rng)).permute(2, 0, 1) for c in y])
        return x, y

    (tx, ty), (vx, vy), (sx, sy) = make(n_train), make(n_eval), make(n_eval)
    return TaskData("cifar10", [f"c{i}" for i in range(classes)], tx, ty, vx, vy, sx, sy)


def small_cfg(**kw) -> TrainConfig:
    base = TrainConfig(model="cnn", depth=2, width=8, batch_size=32, epochs=1, optimizer="adam", lr=3e-3)
    return base.replace(**kw)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, epoch, metrics, save):
        self.calls.append((epoch, dict(metrics), save))


def test_one_epoch_learns_well_above_chance():
    rec = Recorder()
    result = train(small_cfg(), synthetic(), rec, device="cpu")
    assert result["status"] == "completed"
    assert [c[0] for c in rec.calls] == [1]
    _epoch, metrics, save = rec.calls[0]
    assert set(metrics) >= METRICS and callable(save)
    assert {"test/acc", "test/acc/c0", "test/acc/c3"} <= set(metrics)
    assert metrics["val/acc"] > 0.8  # chance is 0.25
    assert result["test/acc"] == metrics["test/acc"] and len(result["confusion"]) == 4


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("model", ["tutorial", "cnn"])
def test_every_optimizer_and_model_trains(optimizer, model):
    cfg = small_cfg(
        optimizer=optimizer,
        model=model,
        lr=0.05 if optimizer == "sgd" else 3e-3,
        amsgrad=optimizer != "sgd",
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.5,
        label_smoothing=0.1,
    )
    result = train(cfg, synthetic(n_train=128, n_eval=32), device="cpu")
    assert result["status"] == "completed" and math.isfinite(result["train/loss"])


def test_resume_matches_uninterrupted_run(tmp_path):
    data = synthetic(n_train=256, n_eval=64)
    cfg = small_cfg(epochs=3, schedule="cosine", warmup_epochs=1, augment="crop-flip")
    full = train(cfg, data, device="cpu")

    ckpt = tmp_path / "epoch1.pt"

    def stop_after_first(epoch, metrics, save):
        if epoch == 1:
            save(ckpt)
            raise KeyboardInterrupt  # an interruption right after the checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, stop_after_first, device="cpu")
    rec = Recorder()
    resumed = train(cfg, data, rec, device="cpu", resume=ckpt)
    assert [c[0] for c in rec.calls] == [2, 3]
    for k in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def test_divergence_stops_at_first_nonfinite_loss():
    rec = Recorder()
    cfg = small_cfg(model="tutorial", optimizer="sgd", lr=50.0, momentum=0.9, epochs=5, batch_size=8)
    result = train(cfg, synthetic(n_train=400), rec, device="cpu")
    assert result["status"] == "diverged"
    assert len(rec.calls) == 1  # it stopped in the epoch it diverged in
    _epoch, metrics, save = rec.calls[0]
    assert metrics["diverged"] == 1.0 and math.isnan(metrics["val/acc"]) and save is None
    assert "test/acc" not in result


def test_checkpoint_loads_for_prediction(tmp_path):
    data = synthetic()
    path = tmp_path / "m.pt"
    train(small_cfg(), data, lambda e, m, save: save(path), device="cpu")
    model, cfg, meta = load_model(path)
    assert cfg == small_cfg() and meta["classes"] == data.classes
    norm = Normalizer(meta["mean"], meta["std"], torch.device("cpu"))
    acc = (model(norm(data.test_x)).argmax(1) == data.test_y).float().mean().item()
    assert acc > 0.8


def test_evaluate_confusion_and_per_class():
    class Always1(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[:, 1] = 1
            return out

    x = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    r = evaluate(Always1(), (x, y), Normalizer((0, 0, 0), (1, 1, 1), torch.device("cpu")), 3, batch_size=4)
    assert r["acc"] == pytest.approx(2 / 6)
    assert r["per_class"] == [0.0, 1.0, 0.0]
    assert r["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 3, 0]]


def test_lr_schedule_warmup_then_cosine():
    f = lr_factor(small_cfg(epochs=10, schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(99) < 0.01
    assert lr_factor(small_cfg(), 10)(5) == 1.0


def test_config_rejects_bad_values_and_unknown_fields():
    with pytest.raises(ConfigError, match="lr"):
        small_cfg(lr=-1)
    with pytest.raises(ConfigError, match="kernel_size"):
        small_cfg(kernel_size=4)
    with pytest.raises(ConfigError, match="unknown config field"):
        small_cfg(learning_rate=0.1)
    assert TrainConfig.from_dict(PRESETS["catdog-seed"].to_dict()) == PRESETS["catdog-seed"]


@pytest.mark.gpu
def test_cuda_bf16_channels_last_trains():
    result = train(small_cfg(epochs=2), synthetic(), device="cuda")
    assert result["status"] == "completed" and result["val/acc"] > 0.8


# --- the precision setting ----------------------------------------------------------------------


def test_precision_resolves_per_device_and_cpu_and_is_checked(monkeypatch):
    import cnnclf.train as t

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert t.uses_bf16(small_cfg(), cuda) and not t.uses_bf16(small_cfg(precision="fp32"), cuda)
    monkeypatch.setattr(t, "cpu_has_bf16", lambda: True)
    assert t.uses_bf16(small_cfg(), cpu)
    monkeypatch.setattr(t, "cpu_has_bf16", lambda: False)
    assert not t.uses_bf16(small_cfg(), cpu) and t.uses_bf16(small_cfg(precision="bf16"), cpu)
    # the seeds rebuild documented float32 runs; the strong presets and the sweeps' trials take auto
    assert {n: c.precision for n, c in PRESETS.items() if "seed" in n} == dict.fromkeys(
        ("cifar10-seed", "cifar10-seed-sgd", "catdog-seed"), "fp32"
    )
    assert PRESETS["catdog-strong"].precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        small_cfg(precision="fp16")
    assert "--precision" in small_cfg(precision="bf16").cli_args()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_on_the_cpu_learns_as_fp32_does_and_says_which_it_used(precision):
    result = train(small_cfg(epochs=2, precision=precision), synthetic(), device="cpu")
    assert result["status"] == "completed" and result["precision"] == precision
    assert result["val/acc"] > 0.8 and math.isfinite(result["test/loss"])  # chance is 0.25


# --- the compile setting ------------------------------------------------------------------------


def test_compile_setting_resolves_per_device_and_is_checked():
    from cnnclf.train import compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert small_cfg().compile == "auto" and all(p.compile == "auto" for p in PRESETS.values())
    assert compile_mode(small_cfg(), cpu) is None and compile_mode(small_cfg(), cuda) == "reduce-overhead"
    assert compile_mode(small_cfg(compile="on"), cpu) == "default"
    assert compile_mode(small_cfg(compile="off"), cuda) is None
    with pytest.raises(ConfigError, match="compile"):
        small_cfg(compile="yes")
    assert TrainConfig.from_dict({k: v for k, v in small_cfg().to_dict().items() if k != "compile"}) == small_cfg()


def test_compile_flag_round_trips_through_the_cli_and_fix():
    from cnnclf.__main__ import build_parser, config_from_args

    cfg = PRESETS["cifar10-strong"].replace(compile="off")
    args = cfg.cli_args()
    assert args[args.index("--compile") + 1] == "off"
    assert config_from_args(build_parser().parse_args(["train", *args])) == cfg
    assert config_from_args(build_parser().parse_args(["train", "--task", "cifar10"])).compile == "auto"


def test_compile_is_a_fix_parameter():
    from cnnclf.args import UsageError
    from sweeps.cli import parse_fix

    assert parse_fix(["compile=off"], TrainConfig()) == {"compile": "off"}
    with pytest.raises(UsageError, match="compile"):
        parse_fix(["compile=fast"], TrainConfig())


def test_fixed_shapes_drop_only_the_ragged_last_batch():
    from cnnclf.train import steps_per_epoch

    assert steps_per_epoch(100, 32, fixed_shapes=False) == 4
    assert steps_per_epoch(100, 32, fixed_shapes=True) == 3  # 4 images left out, different ones each epoch
    assert steps_per_epoch(96, 32, fixed_shapes=True) == 3
    assert steps_per_epoch(20, 32, fixed_shapes=True) == 1  # fewer images than a batch: that batch is the shape
    assert steps_per_epoch(45_000, 4, fixed_shapes=True) == 11_250


@pytest.mark.slow
def test_compiled_run_trains_and_matches_eager(tmp_path):
    """torch.compile on the CPU (inductor's C++ backend, gcc): the same steps as eager within float
    tolerance, compile time reported apart, the ragged batch dropped, and resume still exact."""
    data = synthetic(n_train=96, n_eval=32)  # 3 full batches of 32: eager and compiled take the same steps
    cfg = small_cfg(epochs=2, schedule="cosine", warmup_epochs=1, augment="crop-flip")
    eager = train(cfg, data, device="cpu")
    assert eager["compile_mode"] is None and "time/compile_s" not in eager
    rec = Recorder()
    compiled = train(cfg.replace(compile="on"), data, rec, device="cpu")
    assert compiled["compile_mode"] == "default" and compiled["status"] == "completed"
    for k in ("train/loss", "val/loss"):
        assert compiled[k] == pytest.approx(eager[k], rel=1e-3), k
    assert compiled["val/acc"] == pytest.approx(eager["val/acc"], abs=0.05)
    first, second = rec.calls[0][1], rec.calls[1][1]
    assert first["time/compile_s"] > 0 and "time/compile_s" not in second
    assert compiled["time/compile_s"] == first["time/compile_s"]
    assert first["time/epoch_s"] > first["time/compile_s"]  # the epoch's wall time includes it; images/s does not

    # 100 images: the compiled run drops the ragged 4 and takes 3 steps an epoch (eager: 4).
    ragged = synthetic(n_train=100, n_eval=32)
    ckpt = tmp_path / "c.pt"
    for setting, steps in (("on", 3), ("off", 4)):
        train(cfg.replace(epochs=1, compile=setting), ragged, lambda e, m, save: save(ckpt), device="cpu")
        state = torch.load(ckpt, weights_only=True)
        assert int(state["optimizer"]["state"][0]["step"]) == steps, setting

    # Resume of a compiled run: the uninterrupted compiled run's result.
    on = cfg.replace(epochs=3, compile="on")
    full = train(on, ragged, device="cpu")

    def stop_after_first(epoch, metrics, save):
        if epoch == 1:
            save(ckpt)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(on, ragged, stop_after_first, device="cpu")
    resumed = train(on, ragged, device="cpu", resume=ckpt)
    for k in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k


def test_a_model_that_does_not_take_the_image_size_is_refused_at_once_on_either_device(monkeypatch):
    """check_model_fits pushes one image through the model: on the CPU for a small model, in milliseconds and
    without loading torch's compiler machinery (a second of imports before a typo's answer); on the meta device,
    with nothing allocated, for a large one. Both refuse the tutorial net at 64x64 and take it at 32x32."""
    code = (
        "import sys; from cnnclf.config import TrainConfig; from cnnclf.recipe import check_model_fits\n"
        "check_model_fits(TrainConfig(task='cifar10', model='cnn', width=64, depth=8, image_size=128))\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
    from cnnclf import recipe

    for limit in (recipe.CPU_CHECK_PARAMS, 0):  # 0: every model is "large", so the meta device runs the check
        monkeypatch.setattr(recipe, "CPU_CHECK_PARAMS", limit)
        recipe.check_model_fits(TrainConfig(task="cifar10", model="tutorial", image_size=32))
        with pytest.raises(ValueError, match="the tutorial model does not take 64x64 images"):
            recipe.check_model_fits(TrainConfig(task="cifar10", model="tutorial", image_size=64))
