"""`python -m cnnclf train`'s flags come from TrainConfig's fields (cnnclf.config.flag): every field has its flag or
says why not, today's names, types and choices hold, and a config's reproduce command parses back to it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cnnclf.__main__ import build_parser, config_from_args
from cnnclf.args import nonnegative_float, positive_float, positive_int, seed
from cnnclf.config import MODELS, PRESETS, SWEEP_BASES, TrainConfig, flag_name

# The flags of `train` that are no TrainConfig field.
OWN = {"-h", "--help", "--preset", "--data-dir", "--no-download", "--device", "--save", "--resume", "--json"}


def train_parser() -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["train"]


def test_every_config_field_has_its_flag_or_says_why_not():
    fields = dataclasses.fields(TrainConfig)
    expected = set()
    for f in fields:
        if "no_flag" not in f.metadata:  # a new field declared without flag() or no_flag() lands here and fails
            expected.add(flag_name(f.name))
            if isinstance(f.default, bool):
                expected.add(flag_name(f.name, negative=True))
    actions = train_parser()._actions
    assert {o for a in actions for o in a.option_strings} - OWN == expected
    assert {f.name for f in fields if "no_flag" in f.metadata} == {"val_fraction", "test_fraction", "tags"}
    assert {f.name for f in fields if "no_flag" not in f.metadata} <= {a.dest for a in actions}


def test_flags_keep_their_types_and_choices():
    """Today's flags, as cnnclf/__main__.py listed them by hand before they were generated."""
    kinds = {
        "task": (None, ["cifar10", "catdog"]),
        "model": (None, ["tutorial", "cnn"]),
        "optimizer": (None, ["sgd", "adam", "adamw"]),
        "lr": (positive_float, None),
        "momentum": (nonnegative_float, None),
        "nesterov": ("bool", None),
        "amsgrad": ("bool", None),
        "weight_decay": (nonnegative_float, None),
        "batch_size": (positive_int, None),
        "epochs": (positive_int, None),
        "schedule": (None, ["constant", "cosine", "linear"]),
        "warmup_epochs": (nonnegative_float, None),
        "label_smoothing": (nonnegative_float, None),
        "depth": (positive_int, None),
        "kernel_size": (int, [3, 5, 7]),
        "width": (positive_int, None),
        "image_size": (positive_int, None),
        "normalize": (None, ["half", "dataset", "imagenet"]),
        "augment": (None, ["none", "crop-flip", "resized-crop-flip"]),
        "subset": (positive_int, None),
        "eval_subset": (positive_int, None),
        "seed": (seed, None),
        "split_seed": (seed, None),
        "compile": (
            None,
            ["auto", "on", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        ),
        "precision": (None, ["auto", "fp32", "bf16"]),
    }
    found = {}
    for a in train_parser()._actions:
        if a.dest in kinds:
            kind = "bool" if isinstance(a, argparse.BooleanOptionalAction) else a.type
            found[a.dest] = (kind, None if a.choices is None else list(a.choices))
            assert a.default is None and a.required == (a.dest == "task"), a.dest  # left out: the preset's value
    assert found == kinds


def test_model_choices_are_the_model_registry():
    from cnnclf.models import model_names

    assert sorted(MODELS) == model_names()


def everything_changed() -> TrainConfig:
    """A config with every flagged field away from TrainConfig's default."""
    cfg = TrainConfig(
        task="catdog",
        model="tutorial",
        optimizer="adamw",
        lr=0.0123,
        momentum=0.5,
        nesterov=True,
        amsgrad=True,
        weight_decay=1e-5,
        batch_size=7,
        epochs=3,
        schedule="linear",
        warmup_epochs=0.25,
        label_smoothing=0.05,
        depth=3,
        kernel_size=5,
        width=12,
        image_size=48,
        normalize="half",
        augment="none",
        subset=100,
        eval_subset=20,
        seed=5,
        split_seed=9,
        compile="off",
        precision="bf16",
    )
    default = TrainConfig()
    flagged = [f.name for f in dataclasses.fields(TrainConfig) if "no_flag" not in f.metadata]
    assert [n for n in flagged if getattr(cfg, n) == getattr(default, n)] == []
    return cfg


@pytest.mark.parametrize(
    "cfg",
    [*PRESETS.values(), *SWEEP_BASES.values(), everything_changed(), everything_changed().replace(amsgrad=False)],
)
def test_reproduce_command_parses_back_to_the_same_config(cfg):
    args = build_parser().parse_args(["train", *cfg.cli_args()])
    assert config_from_args(args) == cfg


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "--no-nesterov" in out and "--precision" in out and "peak learning rate" in out
