"""TrainConfig: the CLI maps one-to-one onto the dataclass; bad values are one-line UserErrors."""

from __future__ import annotations

import dataclasses

import pytest

from ganlib.config import ArgumentParser, TrainConfig, add_arguments, from_arguments
from ganlib.errors import UserError
from ganlib.train import main


def parse(*argv: str) -> TrainConfig:
    parser = ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(list(argv)))


def _other_value(name: str, value):
    """A valid value different from the default, and the argv that sets it."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return (not value), [flag if not value else "--no-" + name.replace("_", "-")]
    special = {"mixed_precision": "bf16", "memory_format": "contiguous", "channels": 3, "ema_decay": 0.5, "beta1": 0.25,
               "beta2": 0.75, "net": "mlp", "loss": "hinge", "strategy": "finetune"}  # fixed sets: another member
    if name in special:
        new = special[name]
    elif isinstance(value, int):
        new = value + 3
    elif isinstance(value, float):
        new = value * 2 + 0.125
    else:
        new = value + "x"
    return new, [flag, str(new)]


def test_defaults_parse_to_the_default_config():
    assert parse() == TrainConfig()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)
                                  if f.name not in ("strategy_options", "augment_options")])
def test_every_field_has_a_flag_that_sets_it(name):
    new, argv = _other_value(name, getattr(TrainConfig(), name))
    cfg = parse(*argv)
    assert getattr(cfg, name) == new
    others = {k: v for k, v in cfg.to_dict().items() if k != name}
    assert others == {k: v for k, v in TrainConfig().to_dict().items() if k != name}


# Where files go, logging and timing: the only fields no fingerprint or source key may depend on.
RUN_ONLY = {"out", "resume", "progress", "ckpt_every", "log_every", "warmup_steps", "eval_every", "data_root",
            "download"}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)
                                  if f.name not in ("strategy_options", "augment_options")])
def test_weight_fields_follow_every_field_but_the_run_only_ones(name):
    base = TrainConfig()
    changed = dataclasses.replace(base, **{name: _other_value(name, getattr(base, name))[0]})
    if name in RUN_ONLY:
        assert changed.weight_fields() == base.weight_fields()
    else:
        assert changed.weight_fields() != base.weight_fields()
    assert set(base.to_dict()) - set(base.weight_fields()) == RUN_ONLY


def test_strategy_options_repeat_and_stay_strings_until_the_strategy_types_them():
    cfg = parse("--strategy", "freeze_d", "--strategy-opt", "layers=2", "--strategy-opt", "x=a=b")
    assert cfg.strategy_options == {"layers": "2", "x": "a=b"}


@pytest.mark.parametrize("item", ["layers", "=2", ""])
def test_malformed_strategy_option_is_a_user_error(item):
    with pytest.raises(UserError, match="name=value"):
        parse("--strategy-opt", item)


@pytest.mark.parametrize("values, field", [
    ({"steps": 0}, "steps"), ({"batch": 1}, "batch"), ({"width": 0}, "width"), ({"size": -28}, "size"),
    ({"warmup_steps": -1}, "warmup_steps"), ({"ckpt_every": -5}, "ckpt_every"), ({"r1_gamma": -1.0}, "r1_gamma"),
    ({"channels": 2}, "channels"), ({"mixed_precision": "fp8"}, "mixed_precision"), ({"ema_decay": 1.0}, "ema_decay"),
    ({"lr_g": 0.0}, "lr_g"), ({"lr_d": -1e-4}, "lr_d"),
    # wrong types, as YAML produces them ("2e-4" without a dot is a string in YAML 1.1)
    ({"lr_g": "2e-4"}, "lr_g"), ({"steps": 10.5}, "steps"), ({"steps": True}, "steps"), ({"progress": 1}, "progress"),
    ({"strategy_options": ["layers=2"]}, "strategy_options"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(UserError, match=rf"^{field}="):
        TrainConfig(**values).validate()


def test_ints_are_fine_where_floats_are_meant():
    assert TrainConfig(r1_gamma=10, lr_g=1).validate().r1_gamma == 10


def test_from_dict_rejects_unknown_fields_and_validates():
    assert TrainConfig.from_dict({"steps": 7}).steps == 7
    with pytest.raises(UserError, match="'stepz'"):
        TrainConfig.from_dict({"stepz": 7}, where="m.yaml")
    with pytest.raises(UserError, match="steps=0"):
        TrainConfig.from_dict({"steps": 0})


@pytest.mark.parametrize("argv, words", [
    (["--steps", "abc"], "--steps"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--steps", "0"], "steps=0"),
    (["--mixed-precision", "fp8"], "fp8"),
])
def test_cli_usage_errors_exit_2_with_one_line(argv, words, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert captured.out == ""
    assert not out.exists()


def test_augment_options_come_from_repeated_augment_opt_flags():
    cfg = parse("--augment", "ada", "--augment-opt", "target=0.7", "--augment-opt", "interval=2")
    assert cfg.augment == "ada" and cfg.augment_options == {"target": "0.7", "interval": "2"}
    with pytest.raises(UserError, match="--augment-opt 'target'"):
        parse("--augment-opt", "target")
