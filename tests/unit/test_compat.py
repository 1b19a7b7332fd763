"""milora_megatron/compat.py, in-process: each CPU shim does what megatron's CUDA path does
(the distributed tests run whole models through them on gloo ranks)."""

import numpy as np
import pytest
import torch

from milora_megatron import compat


def test_the_causal_mask_is_megatrons_bottom_right_aligned_mask():
    """True where a query may not attend: above the diagonal, aligned to the last key (a
    query block shorter than the keys sees every earlier key)."""
    for sq, skv in [(4, 4), (3, 5), (1, 6)]:
        expected = torch.tensor([[k > q + (skv - sq) for k in range(skv)] for q in range(sq)])
        assert torch.equal(compat._causal_mask_cpu(sq, skv), expected)


def test_the_cpu_rng_tracker_forks_named_streams_without_disturbing_the_default_one():
    tracker = compat._cpu_rng_tracker_class()()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    torch.manual_seed(1234)
    assert torch.equal(torch.cat([first, second]), torch.rand(6))  # one stream, continued
    with pytest.raises(Exception, match="already exists"):
        tracker.add("model-parallel-rng", 99)


def test_apply_is_idempotent_and_only_for_the_cpu():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert compat.apply("cpu") is True and compat.apply("cpu") is True
    assert hasattr(moe_utils, "te_general_gemm")  # defined on any device: the router's torch path
    # the dispatcher's split sizes reach gloo's all-to-all as numpy arrays, as from a GPU
    sizes = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(sizes, np.ndarray) and sizes.tolist() == [3, 1]
    from megatron.core.tensor_parallel import mappings

    assert mappings.torch.cuda.current_device() is not None  # megatron's torch.cuda calls answer on the CPU


def test_uneven_collectives_take_the_plain_path_on_one_rank():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    compat.apply("cpu")
    group = type("One", (), {"size": lambda self: 1, "rank": lambda self: 0})()
    x = torch.arange(6.0).reshape(3, 2)
    assert not dist.is_initialized()
    assert torch.equal(mappings._gather_along_first_dim(x, group, [3]), x)
    assert torch.equal(mappings._reduce_scatter_along_first_dim(x, group, [3]), x)
