"""The training config: defaults, YAML, key=value overrides, and errors that name the fix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric.training.config import (
    Config,
    ConfigError,
    config_diff,
    config_help,
    load_config,
    parse_override,
)


def test_defaults_are_the_kanji_recipe():
    config = load_config()
    assert config == Config()
    assert config.data.name == "kanji_fonts"
    assert config.loss.name == "NormalizedSoftmaxLoss"
    assert config.eval.select_metric == "map@r"


@pytest.mark.parametrize(
    ("override", "section", "name", "expected"),
    [
        ("train.epochs=3", "train", "epochs", 3),
        ("optimizer.lr=1e-2", "optimizer", "lr", 0.01),
        ("optimizer.lr=1", "optimizer", "lr", 1.0),
        ("optimizer.loss_lr=null", "optimizer", "loss_lr", None),
        ("model.channels=[8, 16]", "model", "channels", [8, 16]),
        ("model.channels=8,16", "model", "channels", [8, 16]),
        ("eval.metrics=[map@r, recall@k]", "eval", "metrics", ["map@r", "recall@k"]),
        ("model.normalize=false", "model", "normalize", False),
        ("data.train_classes=null", "data", "train_classes", None),
        ("miner.name=BatchHardMiner", "miner", "name", "BatchHardMiner"),
    ],
)
def test_overrides_are_coerced_to_the_key_type(override, section, name, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), name)
    assert value == expected and type(value) is type(expected)


def test_params_keys_and_whole_mappings():
    config = load_config(overrides=["loss.params.temperature=0.1"])
    assert config.loss.params == {"temperature": 0.1}
    config = load_config(overrides=["loss.name=TripletMarginLoss", "loss.params={margin: 0.2}"])
    assert config.loss.params == {"margin": 0.2}


def test_default_params_belong_to_the_default_loss():
    assert load_config().loss.params == {"temperature": 0.1}
    assert load_config(overrides=["loss.params.temperature=0.05"]).loss.params == {
        "temperature": 0.05
    }
    assert load_config(overrides=["loss.name=TripletMarginLoss"]).loss.params == {}
    config = load_config(overrides=["loss.name=TripletMarginLoss", "loss.params.margin=0.3"])
    assert config.loss.params == {"margin": 0.3}
    config = load_config(overrides=["loss.name=ProxyAnchorLoss", "loss.params={margin: 0.2}"])
    assert config.loss.params == {"margin": 0.2}


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  name: digits\nmodel:\n  name: mlp\n  embedding_dim: 32\n"
        "loss:\n  name: TripletMarginLoss\n  params: {margin: 0.1}\ntrain:\n  epochs: 4\n"
    )
    config = load_config(path, ["train.epochs=5"])
    assert (config.data.name, config.model.embedding_dim, config.train.epochs) == ("digits", 32, 5)
    assert config.loss.params == {"margin": 0.1}
    assert load_config(base=config.to_dict()) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("trian.epochs=3", "did you mean 'train.epochs'"),
        ("optimiser.lr=0.1", "did you mean 'optimizer.lr'"),
        ("loss.params.temprature=0.1", "did you mean loss.params.temperature"),
        ("loss.name=TripletLoss", "did you mean 'TripletMarginLoss'"),
        ("miner.name=batchhardminer", "did you mean 'BatchHardMiner'"),
        ("optimizer.name=adamw", "did you mean 'AdamW'"),
        ("loss.distance=Cosine", "CosineSimilarity"),
        ("train.epochs=three", "train.epochs must be an integer"),
        ("train.epochs=0", "train.epochs must be > 0"),
        ("optimizer.warmup_ratio=1", "optimizer.warmup_ratio must be in"),
        ("optimizer.warmup_steps=-1", "optimizer.warmup_steps must be >= 0"),
        ("eval.distance=manhattan", "eval.distance must be one of euclidean, cosine"),
        ("model.normalize=maybe", "model.normalize must be true or false"),
        ("train.epochs", "is not key=value"),
        ("data.name=image_folder", "needs data.path"),
        ("loss.params.num_classes=3", "is set by the trainer"),
        ("miner.params.margin=0.1", "miner.name is null"),
        ("eval.metrics=[map@r, recal@1]", "unknown metric 'recal@1'"),
        ("eval.select_metric=nmi_score", "is not among the evaluated metrics"),
        ("eval.select_metric=recall@16", "add it to eval.metrics"),
    ],
)
def test_errors_name_the_problem_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(overrides=[override])


def test_yaml_with_unknown_section_or_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        load_config(path)


def test_help_lists_every_key_with_its_default():
    text = config_help()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"{section.name}.{key.name}=" in text
    assert "train.epochs=2" in text and "The K values of Recall@K." in text


def test_diff_lists_changed_keys():
    old, new = load_config(), load_config(overrides=["train.epochs=9", "loss.params.temperature=1"])
    assert config_diff(old, new) == [
        "loss.params: {'temperature': 0.1} -> {'temperature': 1}",
        "train.epochs: 2 -> 9",
    ]
    assert config_diff(old, load_config()) == []


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    assert parse_override("a.b=") == ("a.b", "")


# Every override either gives a valid config or a one-line ConfigError (never another error).
KEYS = [
    f"{section.name}.{key.name}"
    for section in dataclasses.fields(Config)
    for key in dataclasses.fields(getattr(Config(), section.name))
] + [
    "loss.params.margin",
    "loss.params.num_classes",
    "loss.params.embedding_size",
    "loss.params.temperature",
    "loss.params.scale",
    "miner.params.margin",
    "miner.params.epsilon",
    "train",
    "no.such.key",
]
VALUES = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            ".nan",
            ".inf",
            "-.inf",
            "-1",
            "0",
            "1",
            "3",
            "0.5",
            "1e-3",
            "1e300",
            "[]",
            "[1, 2]",
            "[0]",
            "{}",
            "{margin: 0.1}",
            "abc",
            "auto",
            "'",
            "[",
            "{a:",
            "NormalizedSoftmaxLoss",
            "ArcFaceLoss",
            "MarginLoss",
            "TripletMarginLoss",
            "ProxyAnchorLoss",
            "CenterLoss",
            "BatchHardMiner",
            "MultiSimilarityMiner",
            "EuclideanDistance",
            "CosineSimilarity",
            "LpDistance",
            "SGD",
            "AdamW",
            "image_folder",
            "cosine",
            "map@r",
            "[recall@k, nmi]",
        ]
    ),  # fmt: skip
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_any_override_gives_a_config_or_a_one_line_config_error(pairs):
    try:
        load_config(overrides=[f"{key}={value}" for key, value in pairs])
    except ConfigError as error:
        assert "\n" not in str(error) and str(error)


def test_adaptive_margin_from_the_config():
    from deepmetric.losses import AdaptiveMargin
    from deepmetric.training.components import build_loss

    for margin in ("adaptive", "{adaptive: {update_every: 7, diameter_factor: 1.5}}"):
        config = load_config(
            overrides=["loss.name=AdditiveMarginLoss", f"loss.params={{margin: {margin}}}"]
        )
        loss = build_loss(config.loss.name, config.loss.params, None, 10, 8)
        assert isinstance(loss.margin, AdaptiveMargin)
    assert loss.margin.update_every == 7 and loss.margin.diameter_factor == 1.5
    with pytest.raises(ConfigError, match="the adaptive margin is for AdditiveMarginLoss"):
        load_config(overrides=["loss.name=CosFaceLoss", "loss.params={margin: adaptive}"])
    with pytest.raises(ConfigError, match="margin"):
        load_config(
            overrides=["loss.name=AdditiveMarginLoss", "loss.params={margin: {adaptive: {x: 1}}}"]
        )


def test_val_share_and_select_split_are_checked():
    assert load_config().eval.select_split == "val" and load_config().data.val_share == 0.2
    with pytest.raises(ConfigError, match=r"data.val_share must be in \[0, 1\)"):
        load_config(overrides=["data.val_share=1"])
    with pytest.raises(ConfigError, match="eval.select_split must be one of val, train, test"):
        load_config(overrides=["eval.select_split=all"])


def test_warm_up_is_a_share_of_the_run_unless_given_in_steps():
    from deepmetric.training.components import build_scheduler, warmup_length

    assert warmup_length(None, 0.2, 870) == 174  # the default run: 174 of its 870 steps
    assert warmup_length(None, 0.1, 4) == 0
    assert warmup_length(30, 0.1, 870) == 30 and warmup_length(0, 0.5, 870) == 0
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # linear, then cosine
    assert rates[5:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 8)])
