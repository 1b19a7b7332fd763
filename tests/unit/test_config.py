"""milora_megatron/train/config.py: the schema, its errors, --help, and the shipped configs."""

import os
import subprocess
import sys

import pytest
from paths import ROOT

LAUNCH = os.path.join(ROOT, "launch", "pretrain_milora.py")


@pytest.mark.parametrize("overrides,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; valid keys: model.load"),
    (["train.iters=abc"], "train.iters must be an integer"),
    (["parallel.sp=3"], "parallel.sp must be true or false"),
    (["peft.method=dora"], "peft.method must be one of ['lora', 'mica', 'milora', 'pissa'], got 'dora'"),
    (["train.lr"], "is not key=value"),
    (["train.log_every=0"], "train.log_every must be >= 1"),  # before: a ZeroDivisionError mid-run
    (["train.eval_batches=0"], "train.eval_batches must be >= 1"),
    (["peft.alpha=-8"], "peft.alpha must be > 0"),  # before: a misleading NaN message
    (["peft.svd_backend=lapack"], "peft.svd_backend must be one of"),
])
def test_config_errors(overrides, message):
    import re

    from milora_megatron.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)


def test_shipped_configs_load_with_the_contract_keys():
    from milora_megatron.train.config import load_config, valid_keys

    contract = ["model.load", "data.train", "data.valid", "data.template", "train.iters", "train.epochs",
                "train.global_batch", "train.micro_batch", "train.seq_len", "train.lr", "train.warmup", "train.seed",
                "parallel.tp", "parallel.pp", "parallel.sp", "peft.method", "peft.rank", "peft.alpha", "peft.dropout",
                "peft.targets", "output.dir", "output.save_every"]
    assert set(contract) <= set(valid_keys())
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cfg = load_config(os.path.join(ROOT, "configs", name))
        if name.startswith("llama3_8b"):
            assert cfg.peft.rank in (32, 64) and cfg.train.lr == 3e-4 and cfg.train.warmup == 100
            assert cfg.train.global_batch == 16 and cfg.train.epochs == 3 and cfg.peft.dropout == 0.05
    # numbers as users type them on the command line (YAML alone would read 3e-4 as a string)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), ["train.lr=3e-4", "peft.dropout=0", "train.min_lr=1E-6"])
    assert (cfg.train.lr, cfg.peft.dropout, cfg.train.min_lr) == (3e-4, 0.0, 1e-6)
    cli = subprocess.run([sys.executable, LAUNCH, "--help"], capture_output=True, text=True, check=True).stdout
    for key in contract:
        assert key in cli
    bad = subprocess.run([sys.executable, LAUNCH, "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "x.y=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "valid keys" in bad.stderr


@pytest.mark.parametrize("override,message", [
    ("model.spec=te", "transformer-engine's spec"),
    ("model.dtype=fp8", "model.dtype must be one of"),
    ("model.device=tpu", "model.device must be one of"),
    ("train.recompute=some", "train.recompute must be one of"),
])
def test_config_refuses_what_cannot_run(override, message):
    from milora_megatron.train.config import ConfigError, load_config

    tiny = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(tiny, [override])
    cfg = load_config(tiny, ["model.dtype=bf16", "model.device=cpu", "train.recompute=full"])
    assert (cfg.model.dtype, cfg.model.device, cfg.train.recompute) == ("bf16", "cpu", "full")


def test_malformed_yaml_names_the_file(tmp_path):
    from milora_megatron.train.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(str(bad))


def test_wandb_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from milora_megatron.train.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed \(pip install 'milora-megatron\[wandb\]'\)"):
        load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), ["output.wandb_project=x"])
    load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), [])  # without a project nothing is needed


def test_fixed_on_resume_is_the_fields_own_and_follows_a_rename():
    """The resume guard reads the fields: a fixed key that is renamed stays fixed (a list of
    key names compared by name would silently stop protecting it)."""
    import dataclasses
    import typing

    from milora_megatron.adapters.config import AdapterConfig
    from milora_megatron.train.config import RunConfig, fixed_on_resume
    from milora_megatron.train.run_folder import resume_conflicts

    assert set(fixed_on_resume()) == {
        "peft.method", "peft.rank", "peft.alpha", "peft.targets", "peft.moe_targets", "peft.residual", "data.train",
        "data.subset", "data.split", "data.columns", "data.valid_fraction", "data.template", "data.pack",
        "train.seq_len", "train.seed"}

    def renamed(cls, old, new):
        hints = typing.get_type_hints(cls)
        return dataclasses.make_dataclass(cls.__name__, [
            (new if f.name == old else f.name, hints[f.name], dataclasses.field(default=None, metadata=f.metadata))
            for f in dataclasses.fields(cls)])

    hints = typing.get_type_hints(RunConfig)
    peft = renamed(AdapterConfig, "rank", "lora_rank")
    schema = dataclasses.make_dataclass("RunConfig", [(f.name, peft if f.name == "peft" else hints[f.name])
                                                      for f in dataclasses.fields(RunConfig)])
    saved = {"peft": {"lora_rank": 8, "dropout": 0.05}, "train": {"lr": 1e-4, "seed": 1}}
    now = {"peft": {"lora_rank": 16, "dropout": 0.0}, "train": {"lr": 2e-4, "seed": 1}}
    assert resume_conflicts(saved, now, schema=schema) == ["peft.lora_rank: 8 -> 16"]
    assert resume_conflicts(saved, now) == []  # under the real schema, lora_rank is no key at all


def test_help_lists_each_keys_choices_and_whether_a_resume_may_change_it():
    from milora_megatron.train.config import describe

    text = " ".join(describe(width=10_000).split())
    assert "train.recompute = 'none'" in text and "[one of: none, selective, full]" in text
    assert "[one of: alpaca, metamath, chat] [fixed on resume]" in text  # a registry's names
    assert "[one of: lora, mica, milora, pissa] [fixed on resume]" in text
