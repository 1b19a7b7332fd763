"""A run's configuration: plain dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

Key names are a contract (users' scripts and the Slurm script use them). Unknown keys and
values of the wrong type are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from ..adapters.config import AdapterConfig, option
from ..data.templates import TEMPLATES
from ..device import DEVICES, DTYPES
from ..errors import ConfigError, MissingPathError
from ..models.decoder import RECOMPUTE


@dataclass
class ModelConfig:
    load: str = option("", "base checkpoint written by tools/convert/hf_to_megatron.py")
    spec: str = option("local", "megatron layer spec: local (torch-native SDPA + RMSNorm); 'te' is refused: "
                                "transformer-engine's linears cannot be adapted")
    device: str = option("auto", "auto (this rank's GPU, LOCAL_RANK, when CUDA is visible, else CPU) | cuda | cpu")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (dynamic loss scale) | fp32; the "
                                "adapter factors, their gradients and AdamW state are fp32 in every case")


@dataclass
class DataConfig:
    train: str = option("", "jsonl / json / parquet file, a local dataset folder (save_to_disk, or files laid out "
                            "as a dataset repo), or a Hugging Face dataset id org/name (through the Hub cache: "
                            "HF_HOME, HF_TOKEN, HF_HUB_OFFLINE=1 as huggingface_hub reads them)")
    valid: str = option("", "validation data in the same forms, read at data.valid_split if set (else its 'train' "
                            "split); empty: data.valid_split of data.train's dataset, data.valid_fraction, or no "
                            "validation loss")
    revision: str = option("", "branch, tag or commit of data.train's Hub dataset; empty: its default branch. The "
                               "commit it resolved to is recorded in run.json, and a resume that resolves to another "
                               "is refused")
    subset: str = option("", "data.train's subset (the dataset's config name); empty: the default one")
    split: str = option("train", "the split of data.train trained on")
    valid_split: str = option("", "validation from this split of data.train's dataset (e.g. test); empty: none")
    valid_fraction: float = option(0.0, "validation from a held-out fraction of data.train's examples (chosen by "
                                        "train.seed, never trained on); 0: none")
    columns: dict[str, str] = option({}, "the dataset's column names mapped onto the template's fields: "
                                         "question:instruction,answer:output, or a YAML mapping "
                                         "{question: instruction, answer: output}; a dataset column already named "
                                         "like a mapped field gives way")
    template: str = option("alpaca", "prompt template (data/templates.py): alpaca (instruction/[input]/output) | "
                                     "metamath (query/response); the loss is on the response only | chat "
                                     "(messages: [{role, content}], the tokenizer's chat template, the loss on "
                                     "every assistant turn)")
    forgetting: str = option("", "held-out general text (.txt or a 'text' column) for the forgetting loss against "
                                 "the base model; empty: not measured")
    pack: bool = option(False, "pack examples into train.seq_len sequences, each example attending only to itself "
                               "(else truncate + pad each)")


@dataclass
class TrainConfig:
    iters: int = option(-1, "optimizer steps; -1: from train.epochs; 0: initialise adapters, save, stop")
    epochs: float = option(3.0, "epochs over data.train when train.iters is -1")
    global_batch: int = option(16, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch: int = option(1, "sequences per forward pass on one rank")
    seq_len: int = option(512, "tokens per sequence")
    lr: float = option(3e-4, "peak AdamW learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    schedule: str = option("linear", "decay after warmup: linear | cosine")
    warmup: int = option(100, "steps of linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_grad: float = option(1.0, "global gradient-norm clip; 0 disables")
    seed: int = option(42, "data order, dropout and LoRA's random A")
    eval_every: int = option(100, "validation / forgetting every N steps (and at the end); 0: only at the end")
    eval_batches: int = option(8, "micro-batches per evaluation")
    log_every: int = option(1, "console line and metrics.jsonl record every N steps")
    recompute: str = option("none", "activation recompute: none | selective (megatron's core-attention recompute: "
                                    "with SDPA's flash / cuDNN / memory-efficient kernels no s x s scores are "
                                    "stored, so it saves next to nothing; it matters only for the explicit-mask "
                                    "math path) | full (every layer's input kept, the layer recomputed: the "
                                    "setting that saves memory)")


@dataclass
class ParallelConfig:
    tp: int = option(1, "tensor-parallel size")
    pp: int = option(1, "pipeline-parallel size")
    sp: bool = option(False, "sequence parallelism (needs tp > 1; megatron asks for it when tp > 1 and ep > 1)")
    ep: int = option(1, "expert-parallel size of a mixture-of-experts model: each rank holds experts / ep of every "
                        "sparse layer and tokens travel to their experts by all-to-all; must divide the experts "
                        "and, times the expert TP size, the world size / pp (carved out of DP x TP, as megatron "
                        "does); the router is frozen and never a target, so no load-balancing loss is added")
    etp: int | None = option(None, "expert tensor-parallel size (each expert's linears split over this many "
                                   "ranks, at most parallel.tp); empty/null: parallel.tp, megatron's default")
    timeout_minutes: int = option(30, "how long every process group (the default one, megatron's, the host-side "
                                      "one) waits in a collective before it gives up, as megatron's default")


@dataclass
class OutputConfig:
    dir: str = option("runs/run", "run folder: config.json, run.json, metrics.jsonl, checkpoints/step_N, "
                                  "checkpoints/latest")
    save_every: int = option(0, "steps between checkpoints (0: only at the end)")
    keep_last: int = option(2, "checkpoints kept (the newest ones)")
    fresh_start: bool = option(False, "start from step 0 although output.dir holds a run; the old run is moved to "
                                      "output.dir/previous-<time>/ (without it, a rerun resumes, and a folder whose "
                                      "checkpoints are all unusable is refused). A one-off: leave it out of commands "
                                      "that are rerun to resume (a requeued Slurm job would restart every time)")
    tensorboard: bool = option(True, "TensorBoard event files in output.dir/tensorboard (loss, lr, grad norm, "
                                     "tokens/s, validation and forgetting loss, GPU memory/utilisation, init time)")
    wandb_project: str = option("", "log the same scalars to this Weights & Biases project (needs the wandb "
                                    "extra; WANDB_MODE=offline works without network); empty: no W&B")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def valid_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(key: str, value, hint):
    """Check (and where lossless, convert) ``value`` for a field typed ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if isinstance(value, str):
            from ..data.sources import parse_columns

            value = dict(parse_columns(value))
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping or key:value pairs, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {', '.join(valid_keys())}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a section (mapping), got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, hint)
    try:
        return cls(**kwargs)  # a section may validate itself (peft: AdapterConfig)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if key.strip() not in valid_keys():
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise MissingPathError(f"config file {path} " + ("is a folder, not a YAML file" if os.path.isdir(path)
                                                             else "does not exist"))
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]} "
                                  f"({' '.join(str(exc).split())[-80:]})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(data, item)
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def validate(cfg: RunConfig) -> None:
    t, p = cfg.train, cfg.parallel
    checks = [
        (t.micro_batch >= 1, f"train.micro_batch must be >= 1, got {t.micro_batch}"),
        (t.global_batch >= 1, f"train.global_batch must be >= 1, got {t.global_batch}"),
        (t.seq_len >= 2, f"train.seq_len must be >= 2, got {t.seq_len}"),
        (t.iters >= -1, f"train.iters must be >= 0 (or -1: from train.epochs), got {t.iters}"),
        (t.iters != -1 or t.epochs > 0, "train.epochs must be > 0 when train.iters is -1"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.warmup >= 0, f"train.warmup must be >= 0, got {t.warmup}"),
        (t.schedule in ("linear", "cosine"), f"train.schedule must be linear or cosine, got {t.schedule!r}"),
        (p.tp >= 1 and p.pp >= 1, f"parallel.tp and parallel.pp must be >= 1, got {p.tp}, {p.pp}"),
        (p.ep >= 1, f"parallel.ep must be >= 1, got {p.ep}"),
        (p.etp is None or 1 <= p.etp <= p.tp, f"parallel.etp must be between 1 and parallel.tp ({p.tp}), got {p.etp}: "
                                              "an expert split wider than TP would need its own dropout streams"),
        (p.timeout_minutes >= 1, f"parallel.timeout_minutes must be >= 1, got {p.timeout_minutes}"),
        (0.0 <= cfg.data.valid_fraction < 1.0, f"data.valid_fraction must be in [0, 1), got {cfg.data.valid_fraction}"),
        (not (cfg.data.valid_fraction and (cfg.data.valid or cfg.data.valid_split)),
         "data.valid_fraction holds validation out of data.train: leave data.valid and data.valid_split empty with it"),
        (cfg.data.template in TEMPLATES, f"data.template must be one of {sorted(TEMPLATES)}, got {cfg.data.template!r}"),
        (cfg.model.spec == "local", f"model.spec must be 'local', got {cfg.model.spec!r}: transformer-engine's "
                                    "spec ('te') builds TE linears that the adapters cannot wrap, and it has not run "
                                    "on a GPU here"),
        (cfg.model.device in DEVICES, f"model.device must be one of {list(DEVICES)}, got {cfg.model.device!r}"),
        (cfg.model.dtype in ("auto", *DTYPES), f"model.dtype must be one of {['auto', *DTYPES]}, got {cfg.model.dtype!r}"),
        (t.recompute in RECOMPUTE, f"train.recompute must be one of {list(RECOMPUTE)}, got {t.recompute!r}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}"),
        (t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}"),
        (t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0: off), got {t.clip_grad}"),
        (t.min_lr >= 0 and t.weight_decay >= 0, "train.min_lr and train.weight_decay must be >= 0"),
        (cfg.output.save_every >= 0, "output.save_every must be >= 0"),
        (not cfg.output.wandb_project or _wandb_installed(), "output.wandb_project is set but the wandb package is not "
                                                             "installed (pip install 'milora-megatron[wandb]')"),
        (cfg.output.keep_last >= 1, "output.keep_last must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def describe(width: int = 100) -> str:
    """Every key with its default and documentation (the fields' own), for --help."""
    import textwrap

    lines = []
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(hints[section.name]):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {section.name}.{f.name} = {default!r}")
            lines += textwrap.wrap(f.metadata.get("help", ""), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
