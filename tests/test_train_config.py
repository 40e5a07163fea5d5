"""Run configuration: defaults <- YAML recipe <- overrides, error messages, round trip, recipes.

Also the checks that need a world size (train/validate.py: check) and the image-token count the VLM derives
from its vision section. Nothing here builds a model or touches torch.distributed.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from megatron_nullmoe.run import model
from megatron_nullmoe.run.config import ConfigError, RunConfig, load_config, save_config
from megatron_nullmoe.train import validate as checks

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples").glob("*.yaml"))


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- precedence
def test_no_recipe_no_overrides_gives_the_defaults():
    assert load_config() == RunConfig()


def test_empty_recipe_gives_the_defaults(tmp_path):
    assert load_config(_recipe(tmp_path, "# nothing set\n")) == RunConfig()


def test_override_beats_recipe_beats_default(tmp_path):
    recipe = _recipe(tmp_path, """
steps: 7
seed: 5
model:
  num_experts: 4
  null_experts:
    num_null_experts: 3
    null_logits: per_expert
  vision:
    image_size: 32
""")
    cfg = load_config(recipe, ["steps=9", "model.vision.image_size=64",
                               "model.null_experts.num_null_experts=6", "optim.lr=0.5"])
    default = RunConfig()
    assert cfg.steps == 9  # override over recipe
    assert cfg.model.vision.image_size == 64  # nested override over recipe
    assert cfg.model.null_experts.num_null_experts == 6
    assert cfg.seed == 5  # recipe over default
    assert cfg.model.num_experts == 4
    assert cfg.model.null_experts.null_logits == "per_expert"  # recipe sibling of an override kept
    assert cfg.optim.lr == 0.5  # override into a section the recipe does not mention
    # Untouched keys keep their defaults, also next to the keys that were set.
    assert cfg.model.vision.patch_size == default.model.vision.patch_size
    assert cfg.model.hidden_size == default.model.hidden_size
    assert cfg.optim.min_lr == default.optim.min_lr
    nulls, default_nulls = cfg.model.null_experts, default.model.null_experts
    assert nulls.gate_normalization == default_nulls.gate_normalization


def test_later_override_wins():
    assert load_config(overrides=["steps=3", "steps=4"]).steps == 4


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("override,key,suggestion", [
    ("model.num_expert=4", "model.num_expert", "model.num_experts"),
    ("model.null_experts.num_null_expert=2", "model.null_experts.num_null_expert",
     "model.null_experts.num_null_experts"),
    ("model.vision.image_sise=32", "model.vision.image_sise", "model.vision.image_size"),
    ("stpes=3", "stpes", "steps"),
])
def test_unknown_override_key_names_it_and_the_closest_valid_key(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert f"'{key}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_top_level_key_in_recipe(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_recipe(tmp_path, "modle:\n  num_layers: 2\n"))
    assert "'modle'" in str(err.value)
    assert "did you mean 'model'" in str(err.value)


def test_unknown_nested_key_in_recipe(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_recipe(tmp_path, "model:\n  vison:\n    image_size: 32\n"))
    assert "'model.vison'" in str(err.value)
    assert "did you mean 'model.vision'" in str(err.value)


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("override,needles", [
    ("steps=abc", ["steps='abc'", "an integer"]),
    ("steps=true", ["steps=True", "an integer"]),
    ("model.num_experts=2.5", ["model.num_experts=2.5", "an integer"]),
    ("steps=null", ["steps=None", "an integer"]),
    ("steps=", ["steps=None", "an integer"]),
    ("logging.tensorboard=1", ["logging.tensorboard=1", "true or false"]),
    ("optim.lr=fast", ["optim.lr='fast'", "a number"]),
    ("optim.lr=false", ["optim.lr=False", "a number"]),
    ("model.z_loss_coeff=abc", ["model.z_loss_coeff='abc'", "a number or null"]),
    ("model.router_score_function=softmx",
     ["model.router_score_function='softmx'", "softmax, sigmoid", "did you mean 'softmax'"]),
    ("precision=fp16", ["precision='fp16'", "auto, fp32, bf16"]),
    ("model.null_experts.gate_normalization=keep",
     ["model.null_experts.gate_normalization", "renormalize, keep_null_share"]),
    ("model.vision=3", ["model.vision is a section", "model.vision.<key>"]),
    ("model=abc", ["model is a section"]),
])
def test_bad_value_names_the_field_and_what_is_valid(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("override", ["steps", "=3", "model.num_experts 4"])
def test_override_without_key_or_equals_sign(override):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(overrides=[override])


def test_override_below_a_recipe_value(tmp_path):
    with pytest.raises(ConfigError, match="'steps' is a value, not a section"):
        load_config(_recipe(tmp_path, "steps: 5\n"), ["steps.x=1"])


def test_missing_recipe_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(str(missing))
    assert str(missing) in str(err.value)


def test_invalid_yaml_names_the_path(tmp_path):
    recipe = _recipe(tmp_path, "model:\n  num_layers: [2,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(recipe)
    assert recipe in str(err.value)


def test_recipe_that_is_a_list(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(_recipe(tmp_path, "- steps: 3\n- seed: 1\n"))


@pytest.mark.parametrize("text,key", [("null: 3\n", "'None'"),
                                      ("model:\n  null: 3\n", "'model.None'")])
def test_yaml_null_key_is_a_clear_error(tmp_path, text, key):
    with pytest.raises(ConfigError, match="is not a name") as err:
        load_config(_recipe(tmp_path, text))
    assert key in str(err.value)
    assert "quote it" in str(err.value)


def test_override_value_that_is_not_yaml():
    with pytest.raises(ConfigError, match="name"):
        load_config(overrides=["name=[unclosed"])


# ----------------------------------------------------------------------------- types
def test_optional_fields_accept_null(tmp_path):
    recipe = _recipe(tmp_path, "model:\n  z_loss_coeff: 0.1\ncheckpoint:\n  dir: ckpts\n")
    assert load_config(recipe).model.z_loss_coeff == 0.1
    cfg = load_config(recipe, ["model.z_loss_coeff=null", "checkpoint.dir=~",
                               "model.null_experts.target_real_per_token=null"])
    assert cfg.model.z_loss_coeff is None
    assert cfg.checkpoint.dir is None
    assert cfg.model.null_experts.target_real_per_token is None
    cfg = load_config(overrides=["model.null_experts.target_real_per_token=1.5",
                                 "exit_after_steps=20"])
    assert cfg.model.null_experts.target_real_per_token == 1.5
    assert cfg.exit_after_steps == 20


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = load_config(_recipe(tmp_path, "optim:\n  clip_grad: 2\n"), ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.clip_grad == 2.0 and type(cfg.optim.clip_grad) is float


def test_numbers_are_accepted_as_strings():
    cfg = load_config(overrides=["name=2024"])
    assert cfg.name == "2024"


# ----------------------------------------------------------------------------- round trip
def test_save_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(overrides=[
        "name=123", "dir=runs/x", "steps=11", "exit_after_steps=3", "precision=fp32",
        "model.kind=gpt", "model.z_loss_coeff=0.001", "model.null_experts.num_null_experts=5",
        "model.null_experts.target_real_per_token=1.25", "model.vision.drop_class_token=false",
        "data.kind=jsonl", "data.tokenizer=tok.model", "optim.lr=1", "checkpoint.dir=null",
        "logging.wandb_project='yes'",  # quoted: bare yes is YAML for true
    ])
    assert cfg != RunConfig()
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert again.name == "123" and again.logging.wandb_project == "yes"  # strings stay strings
    assert again.model.vision.drop_class_token is False


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_round_trips(tmp_path, recipe):
    cfg = load_config(str(recipe))
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


# ----------------------------------------------------------------------------- recipes
def test_there_are_recipes():
    assert any(p.name == "demo_vlm.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_builds_a_valid_run(recipe):
    cfg = load_config(str(recipe))
    config = model.decoder_config(cfg, torch.float32)
    assert config.num_moe_experts == cfg.model.num_experts
    assert config.moe_router_topk == cfg.model.router_topk
    assert sum(config.moe_layer_freq) >= 1  # at least one MoE layer
    model.null_config(cfg).check(config)
    decoder_positions = cfg.decoder_seq_length
    assert decoder_positions <= cfg.model.max_position_embeddings
    mp = cfg.parallel.tensor * cfg.parallel.pipeline
    worlds = []
    for world in range(mp, 1025, mp):
        try:
            checks.check(cfg, world)
        except ConfigError:
            continue
        worlds.append(world)
    assert worlds, f"{recipe.name}: no world size <= 1024 passes checks.check"
    dp, micro = checks.check(cfg, worlds[0])
    assert dp * micro * cfg.data.micro_batch_size == cfg.data.global_batch_size


def test_demo_recipe_runs_on_two_ranks():
    cfg = load_config(str(ROOT / "examples" / "demo_vlm.yaml"))
    assert checks.check(cfg, 2) == (2, 2)  # global 32 = 2 ranks x 2 micro-batches x 8


# ----------------------------------------------------------------------------- checks.check
def _parallel_cfg(*extra):
    return load_config(overrides=["parallel.tensor=2", "parallel.expert=2", "model.num_experts=8",
                                  "data.micro_batch_size=2", "data.global_batch_size=16", *extra])


def test_check_returns_dp_and_micro_batches():
    assert checks.check(_parallel_cfg(), 8) == (4, 2)
    assert checks.check(_parallel_cfg(), 16) == (8, 1)


@pytest.mark.parametrize("extra,world,needle", [
    ((), 7, "parallel.tensor"),
    (("parallel.expert=3", "model.num_experts=6"), 8, "parallel.expert=3"),
    (("parallel.tensor=1", "parallel.expert=4", "model.num_experts=6"), 8, "model.num_experts=6"),
    (("data.global_batch_size=12",), 8, "data.global_batch_size=12"),
    (("checkpoint.keep_last=0",), 8, "checkpoint.keep_last=0"),
    (("steps=0",), 8, "steps=0"),
])
def test_check_names_the_field(extra, world, needle):
    with pytest.raises(ConfigError) as err:  # at load (ranges) or at check (layout)
        checks.check(_parallel_cfg(*extra), world)
    assert needle in str(err.value)


def test_eval_at_takes_a_list_of_steps_from_recipe_and_override(tmp_path):
    recipe = _recipe(tmp_path, "steps: 800\nlogging:\n  eval_every: 100\n  eval_at: [50, 650]\n")
    assert load_config(recipe).logging.eval_at == [50, 650]
    assert load_config(recipe, ["logging.eval_at=[750]"]).logging.eval_at == [750]
    assert load_config().logging.eval_at == []
    cfg = load_config(recipe)
    save_config(cfg, tmp_path / "saved.yaml")  # a run folder's config reads back the list
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


@pytest.mark.parametrize("value,needle", [
    ("50", "expected a list"), ("[50, x]", "logging.eval_at[1]='x'"),
    ("[true]", "expected an integer"), ("[10, 0]", "logging.eval_at[1]=0 is not valid: expected >= 1"),
])
def test_eval_at_refuses_what_is_not_a_list_of_steps(value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"logging.eval_at={value}"])
    assert needle in str(err.value)


def test_check_refuses_exit_after_zero_steps():
    with pytest.raises(ConfigError, match="exit_after_steps"):
        checks.check(_parallel_cfg("exit_after_steps=0"), 8)


# ----------------------------------------------------------------------------- model sizes
@pytest.mark.parametrize("size,patch,drop,expected", [
    (48, 8, True, 36), (48, 8, False, 37), (32, 16, True, 4), (64, 8, False, 65),
])
def test_image_tokens(size, patch, drop, expected):
    cfg = load_config(overrides=[f"model.vision.image_size={size}",
                                 f"model.vision.patch_size={patch}",
                                 f"model.vision.drop_class_token={str(drop).lower()}"])
    assert cfg.image_tokens == expected
    assert cfg.decoder_seq_length == expected + cfg.data.seq_length


def test_gpt_has_no_image_tokens():
    assert load_config(overrides=["model.kind=gpt"]).image_tokens == 0


def test_image_size_not_a_multiple_of_patch_size():
    with pytest.raises(ConfigError) as err:  # refused as the config is read
        load_config(overrides=["model.vision.image_size=50", "model.vision.patch_size=8"])
    assert "model.vision.image_size=50" in str(err.value)
    assert "model.vision.patch_size=8" in str(err.value)


def test_moe_layer_freq_pattern_follows_megatron_core():
    """An int n makes layers 0, n, 2n, ... MoE, as megatron-core's own spec builder does."""
    cfg = load_config(overrides=["model.num_layers=4", "model.moe_layer_freq=2"])
    assert model.decoder_config(cfg, torch.float32).moe_layer_freq == [1, 0, 1, 0]
    cfg = load_config(overrides=["model.num_layers=2", "model.moe_layer_freq=3"])
    assert model.decoder_config(cfg, torch.float32).moe_layer_freq == [1, 0]


@pytest.mark.parametrize("overrides,expected", [
    (["model.router_topk=1"], True),  # default: a top-1 gate must not be 1 always
    (["model.router_topk=2"], False),  # default: softmax over the k picks
    (["model.router_topk=2", "model.router_pre_softmax=true"], True),
])
def test_router_pre_softmax_default_and_override(overrides, expected):
    cfg = load_config(overrides=overrides)
    assert model.decoder_config(cfg, torch.float32).moe_router_pre_softmax is expected
    cfg = load_config(overrides=["model.router_topk=1", "model.router_pre_softmax=false"])
    with pytest.raises(ConfigError, match="megatron-core rejects.*pre-softmax when topk is 1"):
        model.decoder_config(cfg, torch.float32)


@pytest.mark.parametrize("freq", [0, -1])
def test_moe_layer_freq_below_one_is_refused(freq):
    cfg = load_config(overrides=[f"model.moe_layer_freq={freq}"])
    with pytest.raises(ConfigError, match="model.moe_layer_freq"):
        model.decoder_config(cfg, torch.float32)


def test_config_is_plain_dataclasses():
    # save_config relies on dataclasses.asdict giving YAML-safe builtins only.
    def leaves(d):  # lists (logging.eval_at) hold builtins too
        for v in (d.values() if isinstance(d, dict) else d):
            yield from leaves(v) if isinstance(v, (dict, list)) else [v]
    cfg = load_config(overrides=["logging.eval_at=[37, 4243]"])
    found = list(leaves(dataclasses.asdict(cfg)))
    assert all(v is None or type(v) in (int, float, str, bool) for v in found)
    assert 37 in found and 4243 in found  # the list's items were reached


def test_tensor_parallel_is_refused_without_te_on_gpu():
    """megatron-core trains MoE + TP only with sequence parallelism, which needs TE norms."""
    from megatron_nullmoe.train.validate import check_device
    from megatron_nullmoe._mcore import have_te

    if torch.cuda.is_available() and have_te():
        pytest.skip("TE on GPU: tensor parallelism is allowed")
    check_device(load_config(overrides=["parallel.tensor=1"]))
    with pytest.raises(ConfigError, match="parallel.tensor=2 needs a GPU with Transformer Engine"):
        check_device(load_config(overrides=["parallel.tensor=2"]))


@pytest.mark.parametrize("overrides,expected", [
    (("parallel.pipeline=2", "model.kind=vlm"), "pipelines the GPT decoder only"),
    (("parallel.pipeline=3", "model.kind=gpt", "model.num_layers=4"), "does not split evenly"),
    (("parallel.pipeline=0", "model.kind=gpt"), "parallel.pipeline=0"),
])
def test_pipeline_layouts_the_trainer_cannot_run_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        checks.check(load_config(overrides=list(overrides)), 12)


@pytest.mark.parametrize("override,needle", [
    ("data.micro_batch_size=0", ">= 1"), ("logging.log_every=0", ">= 1"),
    ("optim.lr=-1", "> 0"), ("model.null_experts.num_null_experts=-2", ">= 0"),
    ("model.null_experts.target_real_per_token=0", "> 0"), ("data.seq_length=0", ">= 1"),
])
def test_out_of_range_values_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError, match=re.escape(override.split("=")[0]) + ".*" + re.escape(needle)):
        load_config(overrides=[override])


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    assert load_config(overrides=["optim.lr=1e-3"]).optim.lr == 1e-3
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(str(recipe)).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["optim.lr=fast"])


def test_null_expert_config_is_the_one_source_of_its_knobs():
    """Every NullExpertConfig field is a recipe key (model.null_experts.<field>) and, unless the
    Megatron-LM path cannot honour it, a Megatron-LM flag, with the same default, and both front
    ends hand the value through unchanged. A field added to NullExpertConfig appears in both."""
    import argparse
    import dataclasses

    from megatron_nullmoe.config import NullExpertConfig
    from megatron_nullmoe.megatron_lm.args import (
        FLAGS, NOT_FOR_MEGATRON_LM, add_null_moe_args, null_config_from_args)
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.model import null_config

    names = [f.name for f in dataclasses.fields(NullExpertConfig)]
    assert set(FLAGS.values()) == set(names) - set(NOT_FOR_MEGATRON_LM)
    cfg = load_config(None, [])
    assert null_config(cfg) == NullExpertConfig()
    assert set(cfg.to_dict()["model"]["null_experts"]) == set(names)
    values = dict(num_null_experts=4, null_logits="per_expert", null_init="zero",
                  gate_normalization="keep_null_share", gate_scale="slot_ratio",
                  target_real_per_token=1.5,
                  budget_update_rate=0.2, target_start_real_per_token=3.0,
                  target_schedule_steps=10, target_schedule="cosine")
    assert set(values) == set(FLAGS.values())  # a new field needs a value in this test too
    cfg = load_config(None, [f"model.null_experts.{k}={v}" for k, v in values.items()])
    assert null_config(cfg) == NullExpertConfig(**values)
    flags = [x for flag, name in FLAGS.items() for x in (flag, str(values[name]))]
    args = add_null_moe_args(argparse.ArgumentParser()).parse_args(flags)
    args.num_experts = 8
    assert null_config_from_args(args) == NullExpertConfig(**values)
    cfg = load_config(None, ["model.null_experts.vision_topk=1", "model.null_experts.text_topk=3"])
    assert null_config(cfg).modality_topk == (1, 3)


@pytest.mark.parametrize("override,message", [
    ("model.null_experts.null_logits=tide", "did you mean 'tied'|one of shared, per_expert"),
    ("model.null_experts.vision_topk=2", "model.null_experts: .*set vision_topk and text_topk"),
    ("model.null_experts.budget_update_rate=0", "model.null_experts.budget_update_rate=0"),
])
def test_null_expert_recipe_errors_name_the_key(override, message):
    from megatron_nullmoe.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_validate_runs_each_check_once(monkeypatch, tmp_path):
    from megatron_nullmoe.config import NullExpertConfig

    calls = []
    for name in ("check_pipeline", "check_model"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    original_check = NullExpertConfig.check
    monkeypatch.setattr(NullExpertConfig, "check",
                        lambda self, c: calls.append("null") or original_check(self, c))
    cfg = load_config(overrides=[f"dir={tmp_path / 'run'}", "parallel.expert=1"])
    assert checks.validate(cfg, 1)[:2] == (1, cfg.data.global_batch_size // cfg.data.micro_batch_size)
    assert sorted(calls) == ["check_model", "check_pipeline", "null"]


# ----------------------------------------------------------------------------- saved runs
def test_a_saved_run_config_without_a_newer_null_field_reads_its_value_before_the_field(
        tmp_path, monkeypatch):
    """A run folder's config.yaml written before a null-expert field existed is read with the
    value that field had in effect then (config.BEFORE_FIELD), not today's default; so are the
    identities of its checkpoints, which refuse a resume that would change it."""
    import yaml

    from megatron_nullmoe import config as null_config_module
    from megatron_nullmoe.run.config import load_run_config
    from megatron_nullmoe.train.checkpoint import identity_differences, run_identity

    # the gate rule's defaults changed in 2026-12 (renormalize, none -> keep_null_share, slot_ratio)
    assert null_config_module.BEFORE_FIELD == {"gate_normalization": "renormalize",
                                               "gate_scale": "none"}
    saved = load_config(None, ["model.null_experts.num_null_experts=4"]).to_dict()
    del saved["model"]["null_experts"]["gate_scale"]
    del saved["model"]["null_experts"]["gate_normalization"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(saved))
    today = load_config(str(old)).model.null_experts  # a recipe: today's defaults
    assert (today.gate_normalization, today.gate_scale) == ("keep_null_share", "slot_ratio")
    then = load_run_config(old).model.null_experts  # a run folder: the values it trained with
    assert (then.gate_normalization, then.gate_scale) == ("renormalize", "none")
    named = tmp_path / "named.yaml"
    saved["model"]["null_experts"]["gate_scale"] = "slot_ratio"
    named.write_text(yaml.safe_dump(saved))
    assert load_run_config(named).model.null_experts.gate_scale == "slot_ratio"

    # a field that is not in BEFORE_FIELD reads today's default
    monkeypatch.delitem(null_config_module.BEFORE_FIELD, "gate_scale")
    assert load_run_config(old).model.null_experts.gate_scale == "slot_ratio"
    monkeypatch.undo()

    cfg = load_config(None, ["model.null_experts.num_null_experts=4"])
    identity, defaults = run_identity(cfg, 100, 1)
    del identity["null"]["gate_scale"]  # a checkpoint saved before the field
    diffs = identity_differences(identity, run_identity(cfg, 100, 1)[0], defaults)
    assert diffs == ["null.gate_scale: checkpoint 'none', this run 'slot_ratio'"]
    # the model section's copy of the null config reads the same older defaults (one place):
    # a run read by load_run_config resumes a checkpoint that never named the new fields
    then_cfg = load_run_config(old)
    identity, defaults = run_identity(then_cfg, 100, 1)
    for section in (identity["null"], identity["model"]["null_experts"]):
        del section["gate_scale"], section["gate_normalization"]
    assert identity_differences(identity, run_identity(then_cfg, 100, 1)[0], defaults) == []


def test_dispatcher_names_come_from_the_dispatch_registry():
    """The recipe's model.token_dispatcher choices and NullExpertConfig's check name exactly the
    dispatchers that dispatch.DISPATCHERS builds; a name outside it is refused with the list."""
    from megatron_nullmoe.config import SUPPORTED_DISPATCHERS
    from megatron_nullmoe.dispatch import DISPATCHERS
    from megatron_nullmoe.run.config import Model

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(Model)}
    assert choices["token_dispatcher"] == SUPPORTED_DISPATCHERS == tuple(DISPATCHERS)
    with pytest.raises(ConfigError, match="model.token_dispatcher='flex'.*alltoall, allgather"):
        load_config(overrides=["model.token_dispatcher=flex"])
