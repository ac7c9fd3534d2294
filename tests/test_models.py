from __future__ import annotations

import pytest
import torch

from cnnclf.config import KERNEL_SIZES, MAX_DEPTH
from cnnclf.models import build_model, count_parameters, model_names, stage_plan


def test_tutorial_net_is_the_seeds_exactly():
    model = build_model("tutorial", num_classes=10)
    assert count_parameters(model) == 62_006
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes[0] == (6, 3, 5, 5) and shapes[2] == (16, 6, 5, 5) and shapes[4] == (120, 400)


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("num_classes", [2, 10])
def test_every_model_output_shape_and_finite(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, depth=3, width=8, image_size=32)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("image_size", [32, 128])
@pytest.mark.parametrize("depth", range(1, MAX_DEPTH + 1))
def test_cnn_family_every_depth(image_size, depth):
    model = build_model("cnn", num_classes=2, depth=depth, kernel_size=3, width=4, image_size=image_size)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth  # depth counts conv layers, at every resolution
    out = model(torch.randn(2, 3, image_size, image_size))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_cnn_family_kernel_sizes_keep_resolution(k):
    model = build_model("cnn", num_classes=10, depth=5, kernel_size=k, width=4, image_size=128)
    assert {m.kernel_size for m in model.modules() if isinstance(m, torch.nn.Conv2d)} == {(k, k)}
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 10)


def test_stage_plan_pools_down_to_4px():
    assert stage_plan(1, 32) == [1]
    assert stage_plan(3, 32) == [1, 1, 1]
    assert stage_plan(8, 32) == [2, 3, 3]  # 3 pools at 32 px: extra depth goes into later stages
    assert stage_plan(5, 128) == [1, 1, 1, 1, 1]
    assert stage_plan(7, 128) == [1, 1, 1, 2, 2]
    assert all(sum(stage_plan(d, s)) == d for d in range(1, 11) for s in (32, 64, 128))


def test_width_doubles_per_stage_capped():
    model = build_model("cnn", num_classes=10, depth=6, width=16, image_size=128)
    outs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert outs == [16, 32, 64, 128, 128, 128]  # stages [1, 1, 1, 1, 2]; 8x width is the cap


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
