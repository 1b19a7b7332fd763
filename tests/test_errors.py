"""Bad inputs give errors that say what is wrong."""

import pytest
import torch

from milora_megatron.adapters import AdapterConfig
from milora_megatron.mapping import layer_layouts


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"unknown peft method 'dora'.*lora.*mica.*milora.*pissa"):
        AdapterConfig(method="dora")


def test_unknown_target_lists_the_targets():
    with pytest.raises(ValueError, match=r"unknown peft target.*qkv_proj.*q_proj"):
        AdapterConfig(targets=["qkv_proj"])


@pytest.mark.parametrize("field,value,message", [("rank", 0, "rank must be >= 1"), ("dropout", 1.0, "dropout"),
                                                  ("residual", "both", "residual")])
def test_bad_numbers(field, value, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{field: value})


def test_alpha_defaults_to_rank():
    cfg = AdapterConfig(rank=16)
    assert cfg.alpha == 16 and cfg.scaling == 1.0


def test_tp_not_dividing_what_it_splits():
    layouts = layer_layouts(heads=4, kv_heads=2, head_dim=2, ffn=10, hidden=6)
    qkv, fc1 = layouts["self_attention.linear_qkv"], layouts["mlp.linear_fc1"]
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 2 query groups"):
        qkv.local(4)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 10 rows of gate_proj"):
        fc1.shard(torch.zeros(20, 6), 4, 0)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 10 input columns"):
        layouts["mlp.linear_fc2"].shard(torch.zeros(6, 10), 4, 0)
