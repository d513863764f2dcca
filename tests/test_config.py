"""Tests for composing the YAML config groups with overrides and checking them against the schema."""
import dataclasses
from enum import Enum
from pathlib import Path

import pytest
import yaml

from ptft.config.compose import GROUPS, compose, to_object
from ptft.config.schema import (
    METHOD_SCHEMAS,
    STAGE_SCHEMAS,
    TASK_SOURCES,
    DataConfig,
    ModelConfig,
    Precision,
    RootConfig,
    TrainConfig,
)
from ptft.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIXED_SCHEMAS = {"model": ModelConfig, "data": DataConfig}
SHIPPED = [(group, path.stem) for group in GROUPS
           for path in sorted((CONFIGS / group).glob("*.yaml"))]


def test_every_group_ships_options():
    assert set(GROUPS) == {"model", "data", "stage", "method"}
    for group in GROUPS:
        assert any(o for g, o in SHIPPED if g == group), f"configs/{group}/ has no option"
    assert ("model", "llama-small") in SHIPPED and ("data", "text-files") in SHIPPED


@pytest.mark.parametrize("group,option", SHIPPED, ids=[f"{g}={o}" for g, o in SHIPPED])
def test_shipped_option_composes_and_converts(group, option):
    # Fine-tuning data only composes with the finetune stage (and the stage is itself a group).
    fine_tuning = group == "data" and option in TASK_SOURCES
    stage = option if group == "stage" else ("finetune" if fine_tuning else "pretrain")
    cfg = compose(stage, [] if group == "stage" else [f"{group}={option}"])
    obj = to_object(cfg)
    assert isinstance(obj, RootConfig)
    block = getattr(obj, group)
    expected = {"stage": STAGE_SCHEMAS, "method": METHOD_SCHEMAS}.get(group, {}).get(option) \
        or FIXED_SCHEMAS[group]
    assert isinstance(block, expected)
    # Every value the YAML sets arrives, typed, in the dataclass. Stage and method options
    # are global packages (they also tune train.*): their own block is under their group key.
    shipped = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}
    shipped.pop("defaults", None)
    if group in ("stage", "method"):
        for other, values in shipped.items():
            if other != group:
                for key, value in values.items():
                    assert getattr(getattr(obj, other), key) == value, f"{other}.{key}"
        shipped = shipped[group]
    assert shipped, f"configs/{group}/{option}.yaml sets nothing"
    for key, value in shipped.items():
        got = getattr(block, key)
        got = got.value if hasattr(got, "value") else got  # enums (model.arch)
        assert got == value, f"{group}.{key}: {got!r} != {value!r}"
    assert isinstance(obj.train, TrainConfig) and isinstance(obj.train.lr, float)


def _usage_error(overrides: list[str]) -> str:
    with pytest.raises(UsageError) as info:
        compose("pretrain", overrides)
    return str(info.value)


def test_misspelled_key_names_it_and_suggests():
    message = _usage_error(["train.lrr=1"])
    assert "train.lrr" in message
    assert "Did you mean 'lr'" in message


def test_misspelled_key_added_with_plus_is_rejected():
    message = _usage_error(["+train.lrr=1"])
    assert "train.lrr" in message
    assert "Did you mean 'lr'" in message


def test_unknown_group_option_lists_available():
    message = _usage_error(["model=nope"])
    assert "nope" in message
    assert "Available" in message
    assert "llama-tiny" in message and "llama-small" in message


def test_near_miss_group_option_suggests_closest():
    message = _usage_error(["model=llama-smal"])
    assert "Did you mean 'llama-small'" in message


def test_wrong_type_names_the_key():
    message = _usage_error(["train.batch_size=abc"])
    assert "train.batch_size" in message


def test_unknown_enum_value_is_rejected():
    message = _usage_error(["train.precision=fp16"])
    assert "train.precision" in message
    assert "fp16" in message


def test_unknown_data_source_is_rejected():
    message = _usage_error(["data.source=foo"])
    assert "data.source" in message and "foo" in message
    assert "text-files" in message  # lists the valid sources


def test_near_miss_data_source_suggests_closest():
    message = _usage_error(["data.source=text-file"])
    assert "Did you mean 'text-files'" in message


def test_key_of_another_method_is_rejected_for_full():
    message = _usage_error(["method.r=16"])
    assert "method.r" in message
    assert "method.r" in _usage_error(["+method.r=16"])


def test_reset_restores_schema_default():
    assert compose("pretrain", ["train.lr=5"]).train.lr == 5
    cfg = compose("pretrain", ["train.lr=5", "~train.lr"])
    assert cfg.train.lr == TrainConfig().lr
    assert to_object(cfg).train.lr == TrainConfig().lr


def test_reset_of_unknown_key_is_rejected():
    message = _usage_error(["~train.lrr"])
    assert "train.lrr" in message


def test_override_after_reset_wins():
    cfg = compose("pretrain", ["~train.lr", "train.lr=5"])
    assert cfg.train.lr == 5


@pytest.mark.parametrize("group", GROUPS)
def test_removing_a_group_is_rejected(group):
    message = _usage_error([f"~{group}"])
    assert f"~{group}" in message


def test_malformed_override_is_reported():
    message = _usage_error(["train.lr=[1"])
    assert "malformed override" in message


def test_overrides_change_values():
    defaults = to_object(compose("pretrain", []))
    assert defaults.train.lr == pytest.approx(1e-3)
    assert defaults.model.name == "llama-tiny"
    assert defaults.data.paths == []

    obj = to_object(compose("pretrain", ["train.lr=3e-4"]))
    assert obj.train.lr == pytest.approx(3e-4)
    assert isinstance(obj.train.lr, float)

    obj = to_object(compose("pretrain", ["data.paths=[a.txt,b.txt]"]))
    assert obj.data.paths == ["a.txt", "b.txt"]

    obj = to_object(compose("pretrain", ["model=llama-small"]))
    assert obj.model.name == "llama-small"
    assert obj.model.hidden_size == 512 and obj.model.num_kv_heads == 4


def test_typed_values_after_conversion():
    obj = to_object(compose("pretrain", ["train.precision=bf16", "train.batch_size=8",
                                         "data.max_documents=null"]))
    assert obj.train.precision is Precision.bf16
    assert obj.train.batch_size == 8
    assert obj.data.max_documents is None
    assert obj.stage.name == "pretrain" and obj.method.name == "full"


@pytest.mark.parametrize("stage, overrides, bound", [
    ("pretrain", ["train.batch_size=0"], "at least 1"),
    ("pretrain", ["train.grad_accum=0"], "at least 1"),
    ("pretrain", ["train.log_every=0"], "at least 1"),
    ("pretrain", ["train.warmup_steps=-1"], "at least 0"),
    ("pretrain", ["train.grad_clip=0"], "above 0"),
    ("pretrain", ["train.max_steps=null", "train.epochs=0"], "above 0"),
    ("pretrain", ["data.eval_fraction=1.5"], "between 0 and 1"),
    ("finetune", ["method=lora", "method.r=0"], "at least 1"),
    ("finetune", ["method=lora", "method.dropout=-0.1"], "between 0 and 1"),
])
def test_numbers_out_of_range_are_rejected_before_a_run(stage, overrides, bound):
    key = overrides[-1].split("=")[0]
    with pytest.raises(UsageError, match=f"{key}=.* out of range: it must be {bound}"):
        compose(stage, overrides)


def test_numbers_at_their_bounds_are_accepted():
    # 0 means "off" for the cadences that allow it; null skips a bound (no clipping).
    cfg = compose("pretrain", ["train.eval_every=0", "train.save_every=0", "train.lr=0",
                               "train.grad_clip=null", "train.warmup_steps=0",
                               "data.eval_fraction=0"])
    assert cfg.train.eval_every == 0 and cfg.train.grad_clip is None


@pytest.mark.parametrize("value", ["/runs/plain", "lr,sweep", "exp(1)", "[x]", "it's",
                                   "back\\slash", "ends\\", "q\\'x", "sp ace", "k=v",
                                   "~/runs/x", "10", "true", "null", "1e-3"])
def test_override_quotes_values_hydra_would_parse(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ptft.config.compose import override
    text = override("run.dir", value)
    assert OverridesParser.create().parse_override(text).value() == value
    assert compose("pretrain", [text]).run.dir == value


def _as_override(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _option_fields():
    from ptft.config.schema import METHOD_SCHEMAS, STAGE_SCHEMAS
    for block, schemas in (("method", METHOD_SCHEMAS), ("stage", STAGE_SCHEMAS)):
        for option, schema in schemas.items():
            for f in dataclasses.fields(schema):
                if f.name != "name":
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    yield block, option, f.name, default


@pytest.mark.parametrize("block, option, key, default", list(_option_fields()),
                         ids=lambda v: str(v) if isinstance(v, str) else "")
def test_every_key_of_a_stage_or_method_option_can_be_set_without_plus(block, option, key,
                                                                        default):
    """Option YAMLs name only some of their schema's keys (use_dora, train_on_prompt, ...);
    the documented `method.use_dora=true` must not need Hydra's `+`."""
    stage = option if block == "stage" else "finetune"
    choice = [f"method={option}"] if block == "method" else []
    from ptft.config.compose import override
    setting = (override(f"{block}.{key}", default) if isinstance(default, str)
               else f"{block}.{key}={_as_override(default)}")
    cfg = compose(stage, [*choice, setting])
    assert cfg[block][key] == default or (default is None and cfg[block][key] is None)


def test_a_bad_value_for_an_option_key_shows_the_value_not_a_template():
    with pytest.raises(UsageError) as info:
        compose("finetune", ["method=lora", "method.use_dora=maybe"])
    assert "'maybe' is not a valid bool" in str(info.value) and "$VALUE" not in str(info.value)
