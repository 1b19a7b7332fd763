"""milora_megatron/train/metrics.py: GPU telemetry finds this rank's GPU by UUID."""

import sys
import types

import pytest
import torch


def test_nvml_finds_the_gpu_by_uuid(monkeypatch):
    """NVML ignores CUDA_VISIBLE_DEVICES: with GPUs 2,3 visible, torch's cuda:0 is NVML's
    index 2, so the lookup must go by UUID."""
    from milora_megatron.train import metrics

    asked = []
    fake = types.SimpleNamespace(nvmlInit=lambda: None,
                                 nvmlDeviceGetHandleByUUID=lambda uuid: asked.append(uuid) or "handle",
                                 nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("looked up by index"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="5b2c3a4d-0000-1111-2222-333344445555"))
    metrics._nvml_handle.cache_clear()
    try:
        assert metrics._nvml_handle() == "handle"
    finally:
        metrics._nvml_handle.cache_clear()
    assert asked == ["GPU-5b2c3a4d-0000-1111-2222-333344445555"]
    assert metrics.nvml_uuid("MIG-abc") == "MIG-abc"
