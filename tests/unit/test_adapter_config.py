"""milora_megatron/adapters/config.py: bad peft settings give errors that say what is wrong."""

import pytest

from milora_megatron.adapters import AdapterConfig


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


