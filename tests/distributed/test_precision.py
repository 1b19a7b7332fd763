"""The GPU path's rules, checked on the CPU: every collective's tensors on the device its
group's backend serves, the device/dtype choice, fp32 master factors inside a bf16 model
(start unchanged, fp32 gradients), the fused gradient norm that counts TP copies once,
fp16's loss scale, per-replica dropout streams and NVML's GPU found by UUID."""

import sys

import torch
from distributed import run_distributed
from paths import ROOT
from tiny import SHAPE, build_gpt, hf_layer_weights, logits



def _collective_devices():
    from megatron.core import parallel_state as ps

    from milora_megatron.device import all_reduce_scalars, collective_device

    groups = (None, ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group())
    return [str(collective_device(g)) for g in groups], all_reduce_scalars([1.0, 2.0], ps.get_tensor_model_parallel_group())


def test_gloo_groups_take_cpu_tensors():
    for devices, summed in run_distributed(_collective_devices, world=2, tp=2):
        assert devices == ["cpu", "cpu", "cpu"] and summed == [2.0, 4.0]


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


def test_bf16_training_keeps_the_small_updates(tmp_path):
    """benchmarks/bench_bf16_factors.py at TP=2: in a bf16 model the fp32 master factors
    follow the fp32 run's update, every step moves them; factors kept in bf16 (the trainer
    before fp32 masters, emulated) round most updates away."""
    import json
    import os
    import subprocess

    root = ROOT
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
