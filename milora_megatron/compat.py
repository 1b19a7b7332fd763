"""The one place where megatron-core's CUDA assumptions are adapted for CPU/gloo runs.

megatron-core 0.16.1 hard-codes ``device="cuda"`` and ``torch.cuda.*`` calls in a few
spots that a CPU run reaches (pipeline schedules, p2p shape exchange, the RNG tracker and
the activation-recompute RNG bookkeeping, the default causal mask). A run on a GPU applies
nothing here; a run on the CPU applies it whether or not a GPU is visible (the tests and
the demo pin the CPU). Everywhere else in this project megatron-core is used as shipped.

Instead of editing megatron's functions, the affected *modules* get a view of ``torch``
whose "cuda" device and ``torch.cuda`` helpers resolve to the CPU; the RNG tracker is
replaced by a subclass that keeps its state in the CPU generator.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_APPLIED = False


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _CudaOnCpu(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside patched megatron modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def is_available():
        return False

    # the MoE all-to-all dispatcher copies its split sizes to the host on a side stream and
    # waits on an event; on the CPU everything is already in order
    @staticmethod
    def Stream(*_args, **_kwargs):
        return _CPU_STREAM

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return _CPU_STREAM

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()


class _CpuStream:
    """The one stream of a CPU run: waits and events are already satisfied."""

    def wait_stream(self, _other) -> None:
        return None

    def record_event(self, *_args, **_kwargs) -> "_CpuStream":
        return self

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _TorchOnCpu(types.ModuleType):
    """A ``torch`` look-alike whose tensor factories map the CUDA device to the CPU."""

    cuda = _CudaOnCpu()

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand"}:

            @functools.wraps(value)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu(kwargs["device"])
                return value(*args, **kwargs)

            return factory
        return value


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG tracker with its named states kept in the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


@functools.lru_cache(maxsize=32)
def _causal_mask_cpu(sq, skv=None):
    skv = sq if skv is None else skv
    return torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=1 + skv - sq)


def _patch_tied_embedding_setup() -> None:
    """Tied embeddings with PP>1: megatron moves the last stage's copy with ``Tensor.cuda()``
    before all-reducing it from the first stage; on CPU that call is made a no-op."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup(self):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = saved

    LanguageModule.setup_embeddings_and_output_layer = setup


def _patch_moe_split_sizes() -> None:
    """The all-to-all dispatcher moves its split sizes to the host as numpy arrays, but only
    when they are CUDA tensors; on the CPU they stay tensors, which the collective's binding
    refuses: hand it plain numpy arrays there too."""
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _patch_uneven_collectives() -> None:
    """gloo's all_gather and reduce_scatter take equal-sized tensors only; megatron's MoE
    dispatcher gathers and reduce-scatters uneven token counts over the expert-TP group
    (``output_split_sizes`` / ``input_split_sizes``). On the CPU: the gather pads every
    part to the longest and trims it back; the reduce-scatter all-reduces the whole input
    and keeps this rank's part (the same sums, more traffic, which a CPU run can afford)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    @functools.wraps(gather)
    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or len(set(output_split_sizes)) == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    @functools.wraps(reduce_scatter)
    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def _no_cuda_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _define_missing_te_names() -> None:
    """Without transformer-engine, megatron's MoE utilities leave ``te_general_gemm``
    undefined yet test it against None in the router's gating GEMM (a NameError on any
    device): define it as None, so the router takes its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply(device) -> bool:
    """Adapt megatron-core for a run on ``device`` (the CPU shims only on the CPU; the
    missing-transformer-engine names everywhere). Idempotent; returns True if the CPU
    adaptation is in place. Call it before building models or seeding."""
    global _APPLIED
    _define_missing_te_names()
    if _APPLIED or torch.device(device).type != "cpu":
        return _APPLIED
    torch_on_cpu = _TorchOnCpu()
    for module_name in (
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "megatron.core.models.gpt.gpt_model",
        "megatron.core.transformer.attention",
        "megatron.core.transformer.dot_product_attention",
        "megatron.core.transformer.transformer_layer",
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.tensor_parallel.utils",
        "megatron.core.tensor_parallel.data",
        "megatron.core.utils",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.dist_checkpointing.strategies.torch",
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "megatron.core.dist_checkpointing.exchange_utils",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.distributed.distributed_data_parallel",
        "megatron.core.distributed.finalize_model_grads",
        "megatron.core.transformer.moe.router",
        "megatron.core.transformer.moe.experts",
        "megatron.core.transformer.moe.token_dispatcher",
        "megatron.core.transformer.moe.moe_utils",
        "megatron.core.transformer.moe.moe_layer",
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = torch_on_cpu

    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as tf_utils

    mp_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # activation recompute saves and restores "the CUDA RNG" around each checkpointed
    # region; on the CPU the default generator (saved beside it) is the only one in use.
    mp_random._get_cuda_rng_state = _no_cuda_rng_state
    mp_random._set_cuda_rng_state = lambda *_args, **_kwargs: None
    tf_utils.get_default_causal_mask = _causal_mask_cpu
    _patch_tied_embedding_setup()
    _patch_moe_split_sizes()
    _patch_uneven_collectives()
    _APPLIED = True
    return True


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default and tensor-parallel RNG streams the way megatron does, on any device
    (after ``apply``, which gives a CPU run its tracker)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
