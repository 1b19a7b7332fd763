"""A run's configuration: plain dataclasses, loaded from YAML plus dotted ``key=value`` overrides.

Key names are a contract (users' scripts and the Slurm script use them). Each key is one
field (``schema.option``): its type and choices are checked from the field, its section checks
its own values, and whether a resume may change it is the field's ``fixed_on_resume``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import yaml

from .. import schema
from ..adapters.config import AdapterConfig
from ..data.templates import TEMPLATES
from ..device import Device, Dtype
from ..errors import ConfigError, MissingPathError
from ..models.decoder import Recompute
from ..schema import Section, option, require


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@dataclass
class ModelConfig(Section):
    name: ClassVar[str] = "model"

    load: str = option("", "base checkpoint written by tools/convert/hf_to_megatron.py")
    spec: Literal["local", "te"] = option("local", "megatron layer spec: local (torch-native SDPA + RMSNorm); 'te' "
                                                   "is refused: transformer-engine's linears cannot be adapted")
    device: Device = option("auto", "auto: this rank's GPU (LOCAL_RANK) when CUDA is visible, else the CPU")
    dtype: Dtype = option("auto", "auto: bf16 on GPU, fp32 on CPU; fp16 runs with a dynamic loss scale; the adapter "
                                  "factors, their gradients and AdamW state are fp32 in every case")

    def check(self):
        require(self.spec == "local", "model.spec must be 'local', got 'te': transformer-engine's spec builds TE "
                                      "linears that the adapters cannot wrap, and it has not run on a GPU here")


@dataclass
class DataConfig(Section):
    name: ClassVar[str] = "data"

    train: str = option("", "jsonl / json / parquet file, a local dataset folder (save_to_disk, or files laid out "
                            "as a dataset repo), or a Hugging Face dataset id org/name (through the Hub cache: "
                            "HF_HOME, HF_TOKEN, HF_HUB_OFFLINE=1 as huggingface_hub reads them)",
                        fixed_on_resume=True)
    valid: str = option("", "validation data in the same forms, read at data.valid_split if set (else its 'train' "
                            "split); empty: data.valid_split of data.train's dataset, data.valid_fraction, or no "
                            "validation loss")
    revision: str = option("", "branch, tag or commit of data.train's Hub dataset; empty: its default branch. The "
                               "commit it resolved to is recorded in run.json, and a resume that resolves to another "
                               "is refused")
    subset: str = option("", "data.train's subset (the dataset's config name); empty: the default one",
                         fixed_on_resume=True)
    split: str = option("train", "the split of data.train trained on", fixed_on_resume=True)
    valid_split: str = option("", "validation from this split of data.train's dataset (e.g. test); empty: none")
    valid_fraction: float = option(0.0, "validation from a held-out fraction of data.train's examples (chosen by "
                                        "train.seed, never trained on); 0: none", fixed_on_resume=True)
    columns: dict[str, str] = option({}, "the dataset's column names mapped onto the template's fields: "
                                         "question:instruction,answer:output, or a YAML mapping "
                                         "{question: instruction, answer: output}; a dataset column already named "
                                         "like a mapped field gives way", fixed_on_resume=True)
    template: str = option("alpaca", "prompt template (data/templates.py): alpaca (instruction/[input]/output) and "
                                     "metamath (query/response), the loss on the response only; chat (messages: "
                                     "[{role, content}] or ShareGPT conversations: [{from, value}], the tokenizer's "
                                     "chat template, the loss on every assistant turn)",
                           choices=lambda: TEMPLATES, fixed_on_resume=True)
    forgetting: str = option("", "held-out general text (.txt or a 'text' column) for the forgetting loss against "
                                 "the base model; empty: not measured")
    pack: bool = option(False, "pack examples into train.seq_len sequences, each example attending only to itself "
                               "(else truncate + pad each)", fixed_on_resume=True)

    def check(self):
        require(0.0 <= self.valid_fraction < 1.0, f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        require(not (self.valid_fraction and (self.valid or self.valid_split)),
                "data.valid_fraction holds validation out of data.train: leave data.valid and data.valid_split empty "
                "with it")


@dataclass
class TrainConfig(Section):
    name: ClassVar[str] = "train"

    iters: int = option(-1, "optimizer steps; -1: from train.epochs; 0: initialise adapters, save, stop")
    epochs: float = option(3.0, "epochs over data.train when train.iters is -1")
    global_batch: int = option(16, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch: int = option(1, "sequences per forward pass on one rank")
    seq_len: int = option(512, "tokens per sequence", fixed_on_resume=True)
    lr: float = option(3e-4, "peak AdamW learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    schedule: Literal["linear", "cosine"] = option("linear", "decay after warmup")
    warmup: int = option(100, "steps of linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip_grad: float = option(1.0, "global gradient-norm clip; 0 disables")
    seed: int = option(42, "data order, dropout and LoRA's random A", fixed_on_resume=True)
    eval_every: int = option(100, "validation / forgetting every N steps (and at the end); 0: only at the end")
    eval_batches: int = option(8, "micro-batches per evaluation")
    log_every: int = option(1, "console line and metrics.jsonl record every N steps")
    recompute: Recompute = option("none", "activation recompute. selective: megatron's core-attention recompute "
                                          "(with SDPA's flash / cuDNN / memory-efficient kernels no s x s scores are "
                                          "stored, so it saves next to nothing; it matters only for the "
                                          "explicit-mask math path); full: every layer's input kept, the layer "
                                          "recomputed (the setting that saves memory)")

    def check(self):
        require(self.micro_batch >= 1, f"train.micro_batch must be >= 1, got {self.micro_batch}")
        require(self.global_batch >= 1, f"train.global_batch must be >= 1, got {self.global_batch}")
        require(self.seq_len >= 2, f"train.seq_len must be >= 2, got {self.seq_len}")
        require(self.iters >= -1, f"train.iters must be >= 0 (or -1: from train.epochs), got {self.iters}")
        require(self.iters != -1 or self.epochs > 0, "train.epochs must be > 0 when train.iters is -1")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(self.warmup >= 0, f"train.warmup must be >= 0, got {self.warmup}")
        require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        require(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        require(self.clip_grad >= 0, f"train.clip_grad must be >= 0 (0: off), got {self.clip_grad}")
        require(self.min_lr >= 0 and self.weight_decay >= 0, "train.min_lr and train.weight_decay must be >= 0")


@dataclass
class ParallelConfig(Section):
    name: ClassVar[str] = "parallel"

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

    def check(self):
        require(self.tp >= 1 and self.pp >= 1, f"parallel.tp and parallel.pp must be >= 1, got {self.tp}, {self.pp}")
        require(self.ep >= 1, f"parallel.ep must be >= 1, got {self.ep}")
        require(self.etp is None or 1 <= self.etp <= self.tp,
                f"parallel.etp must be between 1 and parallel.tp ({self.tp}), got {self.etp}: an expert split wider "
                "than TP would need its own dropout streams")
        require(self.timeout_minutes >= 1, f"parallel.timeout_minutes must be >= 1, got {self.timeout_minutes}")


@dataclass
class OutputConfig(Section):
    name: ClassVar[str] = "output"

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

    def check(self):
        require(self.save_every >= 0, "output.save_every must be >= 0")
        require(self.keep_last >= 1, "output.keep_last must be >= 1")
        require(not self.wandb_project or _wandb_installed(), "output.wandb_project is set but the wandb package is "
                                                              "not installed (pip install 'milora-megatron[wandb]')")


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


def valid_keys() -> list[str]:
    return schema.valid_keys(RunConfig)


def fixed_on_resume() -> list[str]:
    """The keys a resume may not change (the fields marked so)."""
    return schema.fixed_keys(RunConfig)


def describe(width: int = 100) -> str:
    """Every key with its default, choices and documentation, for --help."""
    return schema.describe(RunConfig, width)


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
    return schema.build(RunConfig, data)


