"""milora_megatron/adapters/config.py: bad peft settings give errors that say what is wrong."""

import pytest

from milora_megatron.adapters import AdapterConfig
from milora_megatron.errors import ConfigError


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"peft.method must be one of \['lora', 'mica', 'milora', 'pissa'\], got 'dora'"):
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




def test_moe_targets_are_checked_and_refused_on_a_dense_model():
    import torch

    from milora_megatron.adapters.apply import find_targets
    from milora_megatron.models.decoder import DecoderShape

    with pytest.raises(ConfigError, match=r"peft.moe_targets must be one of \['all', 'dense', 'experts'\]"):
        AdapterConfig(moe_targets="routers")
    chunk = torch.nn.Module()
    chunk.decoder_shape = DecoderShape()  # a dense model
    with pytest.raises(ConfigError, match="peft.moe_targets='experts' is for mixture-of-experts models"):
        find_targets([chunk], AdapterConfig(moe_targets="experts"), tp_size=1)
