"""The GPU path's rules, checked on the CPU: every collective's tensors on the device its
group's backend serves, the device/dtype choice, fp32 master factors inside a bf16 model
(start unchanged, fp32 gradients), the fused gradient norm that counts TP copies once,
fp16's loss scale, per-replica dropout streams and NVML's GPU found by UUID."""

import sys
import types

import pytest
import torch
from distributed import run_distributed
from tiny import SHAPE, build_gpt, hf_layer_weights, logits

from milora_megatron.device import device_type_for_backend, resolve_device, resolve_dtype


def test_collective_device_is_a_function_of_the_backend():
    assert device_type_for_backend("nccl") == "cuda"
    assert device_type_for_backend("cpu:gloo,cuda:nccl") == "cuda"  # NCCL serves the GPU tensors
    assert device_type_for_backend("gloo") == "cpu"
    assert device_type_for_backend("mpi") == "cpu"


def _collective_devices():
    from megatron.core import parallel_state as ps

    from milora_megatron.device import all_reduce_scalars, collective_device

    groups = (None, ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group())
    return [str(collective_device(g)) for g in groups], all_reduce_scalars([1.0, 2.0], ps.get_tensor_model_parallel_group())


def test_gloo_groups_take_cpu_tensors():
    for devices, summed in run_distributed(_collective_devices, world=2, tp=2):
        assert devices == ["cpu", "cpu", "cpu"] and summed == [2.0, 4.0]


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


@pytest.mark.parametrize("override,message", [
    ("model.spec=te", "transformer-engine's spec"),
    ("model.dtype=fp8", "model.dtype must be one of"),
    ("model.device=tpu", "model.device must be one of"),
    ("train.recompute=some", "train.recompute must be one of"),
])
def test_config_refuses_what_cannot_run(override, message):
    import os

    from milora_megatron.train.config import ConfigError, load_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_cpu.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(tiny, [override])
    cfg = load_config(tiny, ["model.dtype=bf16", "model.device=cpu", "train.recompute=full"])
    assert (cfg.model.dtype, cfg.model.device, cfg.train.recompute) == ("bf16", "cpu", "full")


def _bf16_masters_worker():
    from megatron.core import parallel_state as ps

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters
    from milora_megatron.adapters.layer import adapters_disabled
    from milora_megatron.train.gradients import clip_, global_grad_norm

    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    model = build_gpt(hf_layer_weights(cond=1e3), tp, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, SHAPE["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = logits(model, tokens)
    targets = apply_adapters(model, AdapterConfig(method="milora", rank=4, targets=["q_proj", "v_proj", "o_proj", "down_proj"]),
                             group)
    with torch.no_grad():
        after = logits(model, tokens)
        with adapters_disabled(model):
            disabled = logits(model, tokens)
    dtypes = {str(getattr(t.adapter, f).dtype) for t in targets for f in ("lora_A", "lora_B", "lora_A0", "lora_B0")}
    marks = {(t.target, f): bool(getattr(t.adapter, f).tensor_model_parallel) for t in targets for f in ("lora_A", "lora_B")}
    model.train()
    logits(model, tokens).float().logsumexp(-1).mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_dtypes = {str(p.grad.dtype) for p in params}
    # reference norm: every factor's whole gradient once (split ones gathered over TP)
    sq = 0.0
    for t in targets:
        for f in ("lora_A", "lora_B"):
            g = getattr(t.adapter, f).grad.double()
            dim = t.factor_split_dim(f)
            if dim is not None:
                parts = [torch.empty_like(g) for _ in range(tp)]
                torch.distributed.all_gather(parts, g.contiguous(), group=group)
                g = torch.cat(parts, dim)
            sq += g.pow(2).sum().item()
    norm = global_grad_norm(params, ps.get_model_parallel_group())
    clip_(params, 0.5 * norm.item(), norm)
    clipped = global_grad_norm(params, ps.get_model_parallel_group()).item()
    return {"unchanged": torch.equal(before, after), "disabled": torch.equal(before, disabled), "dtypes": dtypes,
            "marks": marks, "grad_dtypes": grad_dtypes, "norm": norm.item(), "reference": sq ** 0.5,
            "clipped_ratio": clipped / norm.item()}


def test_bf16_model_with_fp32_master_factors():
    results = run_distributed(_bf16_masters_worker, world=2, tp=2)
    for r in results:
        assert r["unchanged"] and r["disabled"]  # branch mode: bit-identical output in bf16
        assert r["dtypes"] == {"torch.float32"} and r["grad_dtypes"] == {"torch.float32"}
        # megatron's TP marks: column targets split B, row targets split A
        assert r["marks"] == {("q_proj", "lora_A"): False, ("q_proj", "lora_B"): True,
                              ("v_proj", "lora_A"): False, ("v_proj", "lora_B"): True,
                              ("o_proj", "lora_A"): True, ("o_proj", "lora_B"): False,
                              ("down_proj", "lora_A"): True, ("down_proj", "lora_B"): False}
        assert abs(r["norm"] - r["reference"]) <= 1e-6 * r["reference"]  # TP copies counted once
        assert abs(r["clipped_ratio"] - 0.5 * r["norm"] / (r["norm"] + 1e-6)) <= 1e-6  # torch's clip coefficient
    assert results[0]["norm"] == results[1]["norm"]


def test_fp16_loss_scale():
    from milora_megatron.train.gradients import LossScale

    scale = LossScale(dynamic=True, initial=1024.0, growth_interval=2)
    assert scale.update(True) and scale.scale == 1024.0
    assert scale.update(True) and scale.scale == 2048.0  # two clean steps: doubled
    assert not scale.update(False) and scale.scale == 1024.0  # overflow: step skipped, halved
    restored = LossScale(dynamic=True)
    restored.load_state_dict(scale.state_dict())
    assert (restored.scale, restored.clean_steps) == (1024.0, 0)
    constant = LossScale(dynamic=False)
    assert constant.scale == 1.0 and constant.update(True) and not constant.update(False)


def _dropout_streams():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from milora_megatron.train.parallel import ParallelGroups, seed_per_replica

    seed_per_replica(42, ParallelGroups.from_megatron())
    default = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        tensor_parallel = torch.rand(4)
    return ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(), default, tensor_parallel


def test_each_data_parallel_replica_draws_its_own_dropout():
    results = run_distributed(_dropout_streams, world=4, tp=2)  # TP=2 x DP=2
    by_dp = {}
    for dp, _tp, default, tensor_parallel in results:
        by_dp.setdefault(dp, []).append((default, tensor_parallel))
    for ranks in by_dp.values():  # one replica: a shared default stream, TP streams apart
        assert torch.equal(ranks[0][0], ranks[1][0]) and not torch.equal(ranks[0][1], ranks[1][1])
    assert not torch.equal(by_dp[0][0][0], by_dp[1][0][0])  # replicas apart
    assert not torch.equal(by_dp[0][0][1], by_dp[1][0][1])


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


def test_bf16_training_keeps_the_small_updates(tmp_path):
    """benchmarks/bench_bf16_factors.py at TP=2: in a bf16 model the fp32 master factors
    follow the fp32 run's update, every step moves them; factors kept in bf16 (the trainer
    before fp32 masters, emulated) round most updates away."""
    import json
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bf16.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(root, "benchmarks", "bench_bf16_factors.py"), "--steps", "20", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fp32, bf16, bf16_factors = json.loads(out.read_text())["results"]
    assert bf16["factor_dtype"] == bf16["optimizer_state_dtype"] == "float32"
    assert bf16["idle_step_fraction"] == 0.0 and bf16["unchanged_entry_fraction"] < 0.01
    assert bf16["update_rel_diff_vs_fp32"] < 0.15  # bf16 activations only
    assert bf16_factors["factor_dtype"] == "bfloat16"
    assert bf16_factors["unchanged_entry_fraction"] > 0.5 and bf16_factors["update_rel_diff_vs_fp32"] > 0.5
