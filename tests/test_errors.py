"""Bad inputs give errors that say what is wrong."""

import pytest
import torch

from milora_megatron.adapters import AdapterConfig
from milora_megatron.adapters.targets import layout_for
from milora_megatron.convert.layout import col_shard, fc1_shard, qkv_shard
from tiny import transformer_config


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


def test_tp_not_dividing_query_groups():
    cfg = transformer_config(groups=4)
    with pytest.raises(ValueError, match=r"TP size 3 does not divide the 4 query groups"):
        layout_for("self_attention.linear_qkv", cfg, 3, 24)


def test_tp_not_dividing_dimensions_in_shard_helpers():
    w = torch.zeros(10, 6)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the output size \(10\)"):
        from milora_megatron.convert.layout import row_shard
        row_shard(w, 4, 0)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the input size \(6\)"):
        col_shard(w, 4, 0)
    with pytest.raises(ValueError, match=r"FFN size"):
        fc1_shard(w, w, 4, 0)
    with pytest.raises(ValueError, match=r"query groups"):
        qkv_shard(torch.zeros(8, 4), torch.zeros(4, 4), torch.zeros(4, 4), heads=4, groups=2, tp=4, rank=0)
