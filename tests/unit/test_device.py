"""milora_megatron/device.py: the run's device and dtype, and the device a collective's
tensors need (a function of the group's backend)."""

import pytest
import torch

from milora_megatron.device import device_type_for_backend, resolve_device, resolve_dtype


def test_collective_device_is_a_function_of_the_backend():
    assert device_type_for_backend("nccl") == "cuda"
    assert device_type_for_backend("cpu:gloo,cuda:nccl") == "cuda"  # NCCL serves the GPU tensors
    assert device_type_for_backend("gloo") == "cpu"
    assert device_type_for_backend("mpi") == "cpu"


def test_device_and_dtype_choice(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu")  # no GPU visible to the suite
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="model.device must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU: 1 visible"):
        resolve_device("auto")  # e.g. torchrun --nproc_per_node 2 on a one-GPU machine
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_a_cpu_run_never_touches_cuda_for_its_rng_state(monkeypatch):
    """train/state.py asks the run's device, not torch.cuda.is_available(): on a GPU node a
    model.device=cpu run would otherwise open a CUDA context on GPU 0 in every rank."""
    from milora_megatron.device import on_gpu
    from milora_megatron.train.state import rng_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node

    def touched(*a, **k):
        raise AssertionError("torch.cuda used by a CPU run")

    monkeypatch.setattr(torch.cuda, "get_rng_state", touched)
    assert "cuda" not in rng_state(torch.device("cpu"))
    assert on_gpu(torch.device("cuda", 0)) and not on_gpu(torch.device("cpu"))
