"""The settings: YAML typing, default remat, resolved config.yaml, the flags built from the
schema, the checks."""
import argparse
import dataclasses
from pathlib import Path

import pytest

from lisa_jax import cli
from lisa_jax.config import (TrainConfig, TrainError, check_config, choices, help_text,
                             load_config, with_default_remat)
from lisa_jax.train import train


def test_yaml_numbers_pyyaml_reads_as_strings_are_typed(tmp_path):
    """PyYAML reads ``1e-5`` (no dot) and quoted numbers as strings; the config takes them as
    the settings' types."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text('lr: 1e-5\nbatch_size: "4"\nprogress: "no"\nlora_alpha: null\n')
    c = load_config(str(cfg))
    assert (c.lr, c.batch_size, c.progress, c.lora_alpha) == (1e-5, 4, False, None)
    assert isinstance(c.lr, float) and isinstance(c.batch_size, int)


def test_yaml_config_with_flag_overrides_is_saved_resolved(model_dir, data_file, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {model_dir}\ndata: {data_file}\nlr: 0.5\nsteps: 3\n")
    cfg = load_config(str(cfg_file), {"lr": 0.25, "out": str(tmp_path / "o")})
    assert cfg.lr == 0.25 and cfg.steps == 3 and cfg.model == model_dir
    cfg.progress, cfg.export, cfg.batch_size, cfg.max_seq_len = False, False, 4, 128
    train(cfg)
    import yaml
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["lr"] == 0.25 and saved["steps"] == 3
    assert saved["remat"] == "none"  # the method's default, written out


@pytest.mark.parametrize("method,expected", [("lisa", "none"), ("full", "dots"), ("lora", "dots")])
def test_default_remat_keeps_matmul_outputs_for_every_method(method, expected):
    """LISA's "none" and plain autodiff's "dots" both keep the matmul outputs and recompute
    the elementwise ops; a remat given explicitly is left alone."""
    from lisa_jax.config import TrainConfig, with_default_remat
    assert with_default_remat(TrainConfig(method=method)).remat == expected
    assert with_default_remat(TrainConfig(method=method, remat="full")).remat == "full"


def test_every_flag_takes_its_help_and_choices_from_the_schema():
    """Each setting declares its help text (and allowed values) once, beside its field; the
    command line's flags show them."""
    actions = {a.dest: a for a in cli.train_parser()._actions}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        assert help_text(f.name), f.name
        if f.name == "lr":  # its default is the method's, said in the help text
            assert action.help == help_text("lr")
        else:
            assert action.help == f"{help_text(f.name)} (default: {getattr(defaults, f.name)})"
        if choices(f.name):
            assert action.metavar == "{" + ",".join(choices(f.name)) + "}"
    assert not hasattr(cli, "_HELP")
    assert choices("method") == ("lisa", "full", "lora")
    assert choices("lr") == ()


@pytest.mark.parametrize("method", ["lisa", "full", "lora"])
def test_the_learning_rate_defaults_to_the_methods_own(method):
    """Without --lr each method gets its own rate (LoRA's tuned best is 10x full
    fine-tuning's, LISA's 2-6x); the help text names them all, and --lr overrides."""
    from lisa_jax.config import DEFAULT_LR
    assert load_config(None, {"method": method}).lr == DEFAULT_LR[method]
    assert load_config(None, {"method": method, "lr": "3e-4"}).lr == 3e-4
    assert DEFAULT_LR["full"] < DEFAULT_LR["lisa"] < DEFAULT_LR["lora"]
    import re
    said = {name: float(v) for name, v in re.findall(r"(LISA|full|LoRA) ([0-9.e-]+)",
                                                      help_text("lr"))}
    assert said == {"LISA": DEFAULT_LR["lisa"], "full": DEFAULT_LR["full"],
                    "LoRA": DEFAULT_LR["lora"]}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)
                                  if f.metadata["choices"] and f.name != "lisa_reset"])
def test_a_value_outside_a_settings_choices_is_a_one_line_error(name, tmp_path):
    """The checks reject what the schema does not list (``lisa_reset`` is checked by
    ``lisa_jax.lisa``), in a one-line error naming the value."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    good = TrainConfig(model=str(tmp_path / "m"), data=str(tmp_path / "d.jsonl"), remat="none")
    cfg = dataclasses.replace(good, **{name: "bogus"})
    with pytest.raises(TrainError, match="'bogus'") as e:
        check_config(cfg)
    assert len(str(e.value).splitlines()) == 1
    check_config(dataclasses.replace(good, **{name: choices(name)[0]}))  # the first: default


def test_bool_flags_are_boolean_options():
    actions = {a.dest: a for a in cli.train_parser()._actions}
    assert isinstance(actions["resume"], argparse.BooleanOptionalAction)
    assert load_config(None, {"resume": "yes"}).resume is True


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "llama2-7b-lisa.yaml", "llama2-7b-lora.yaml",
            "llama2-7b-full.yaml"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_validates_and_names_its_command(path):
    """Each file of configs/ reads with the trainer's loader and passes its checks (model and
    data paths aside: they are placeholders), and its first line is the command that runs it."""
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# lisa-jax train --config configs/{path.name} --out runs/"), first
    cfg = with_default_remat(load_config(str(path)))
    check_config(cfg, paths=False)
    if cfg.demo:  # the bundled demo: the same run as --demo, and it needs no placeholder
        assert cfg == with_default_remat(load_config(None, {"demo": True}))
        check_config(cfg)
    else:
        assert cfg.model and cfg.data and cfg.dtype == "bfloat16"


def test_check_config_without_paths_still_checks_the_settings():
    with pytest.raises(TrainError, match="--lr must be a positive number"):
        check_config(with_default_remat(TrainConfig(model="m", data="d", lr=-1.0)), paths=False)
    check_config(with_default_remat(TrainConfig(model="m", data="d")), paths=False)
    with pytest.raises(TrainError, match="has no config.json"):
        check_config(with_default_remat(TrainConfig(model="m", data="d")))


@pytest.mark.parametrize("changes,fix", [
    (dict(frozen_residuals="fp8"), "add it or use --frozen-residuals bf16"),
    (dict(frozen_residuals="fp8", frozen_precision="fp8", remat="mlp"),
     "--remat mlp keeps none of them; use --remat none or qkv, or --frozen-residuals bf16"),
    (dict(frozen_residuals="fp8_qkv", frozen_precision="fp8", remat="full"),
     "keeps the frozen layers' q, k, v, gate, up in fp8, and --remat full keeps none of them; use "
     "--remat none, qkv or mlp"),
    (dict(frozen_residuals="fp4", frozen_precision="fp8"),
     "use one of bf16, fp8, fp8_qkv, fp8_all")])
def test_fp8_residuals_need_fp8_frozen_layers_that_save_gate_and_up(changes, fix):
    from lisa_jax.config import check_frozen_precision
    cfg = dataclasses.replace(TrainConfig(method="lisa", remat="none"), **changes)
    with pytest.raises(TrainError, match=fix) as e:
        check_frozen_precision(cfg)
    assert "\n" not in str(e.value)
    check_frozen_precision(dataclasses.replace(cfg, frozen_residuals="bf16", remat="none"))
