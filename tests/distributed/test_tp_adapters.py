"""Adapters on a tiny megatron GPT at TP 1/2/4 and PP 2, against single-rank references."""

import pytest
import torch
from distributed import run_distributed
from tiny import build_gpt, hf_layer_weights, logits

METHODS = ["lora", "pissa", "milora", "mica"]
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


def _model_worker(methods, residuals):
    from megatron.core import parallel_state as ps

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters
    from milora_megatron.adapters.layer import adapters_disabled

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    weights = hf_layer_weights()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for method in methods:
        for residual in residuals:
            model = build_gpt(weights, tp, pp=pp).eval()
            last = ps.is_pipeline_last_stage()
            before = logits(model, tokens) if pp == 1 else None
            cfg = AdapterConfig(method=method, rank=RANK, alpha=2 * RANK, residual=residual, targets=ALL_TARGETS)
            targets = apply_adapters(model, cfg, ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group())
            factors = {
                t.name: (t.shard_dim, t.module.adapters[t.target].lora_A.detach().clone(),
                         t.module.adapters[t.target].lora_B.detach().clone())
                for t in targets
            }
            with torch.no_grad():
                change = (logits(model, tokens) - before).abs().max().item() if pp == 1 else None
                if pp == 1:
                    # The adapted model minus its adapters is the base model (both residual modes):
                    # shift the adapters' A so their own delta is not zero, then switch them off.
                    for t in targets:
                        t.module.adapters[t.target].lora_A.add_(0.1)
                    with adapters_disabled(model):
                        base_change = (logits(model, tokens) - before).abs().max().item()
            trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            out[(method, residual)] = {"change": change, "factors": factors, "trainable": trainable,
                                       "base_change": base_change if pp == 1 else None,
                                       "scale": before.abs().max().item() if before is not None else None,
                                       "last": last}
    return out


def _gather_factors(results, tp):
    """Full A and B per target from the TP ranks' shards."""
    full = {}
    for name, (shard_dim, _, _) in results[0]["factors"].items():
        a = [r["factors"][name][1] for r in results[:tp]]
        b = [r["factors"][name][2] for r in results[:tp]]
        if shard_dim == 0:
            full[name] = (a[0], torch.cat(b))
        else:
            full[name] = (torch.cat(a, dim=1), b[0])
    return full


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(_model_worker, world=1, tp=1, methods=METHODS, residuals=["branch", "merge"])


@pytest.mark.parametrize("tp", [2, 4])
def test_factors_equal_tp1_and_output_unchanged(tp1, tp):
    results = run_distributed(_model_worker, world=tp, tp=tp, methods=METHODS, residuals=["branch", "merge"])
    for key in tp1[0]:
        method, residual = key
        ref = _gather_factors([tp1[0][key]], 1)
        got = _gather_factors([r[key] for r in results], tp)
        assert ref.keys() == got.keys()
        for name in ref:
            for g, r in zip(got[name], ref[name]):
                assert (g - r).abs().max() <= 1e-6, (key, name)
        for r in results:
            change, scale = r[key]["change"], r[key]["scale"]
            if residual == "branch" or method in ("lora", "mica"):
                assert change == 0.0, key  # W untouched and the delta is exactly zero at init
            else:
                assert change <= 1e-6 * scale, key  # fp32 rounding of W - s*B0*A0
            assert all(".adapters." in n for n in r[key]["trainable"])
            assert r[key]["base_change"] <= 1e-6 * scale, key
    trainable = tp1[0][("mica", "branch")]["trainable"]
    assert trainable and all(n.endswith("lora_A") for n in trainable)  # MiCA trains A only


def test_k_proj_adapter_is_the_svd_of_the_hf_k_matrix(tp1):
    results = run_distributed(_model_worker, world=2, tp=2, methods=["milora", "pissa"], residuals=["branch"])
    weights = hf_layer_weights()
    for method in ("milora", "pissa"):
        full = _gather_factors([r[(method, "branch")] for r in results], 2)
        for layer in range(len(weights)):
            k = weights[layer]["k_proj"].double()
            u, s, vh = torch.linalg.svd(k, full_matrices=False)
            sel = slice(0, RANK) if method == "pissa" else slice(s.numel() - RANK, s.numel())
            expected = (u[:, sel] * s[sel]) @ vh[sel]
            a, b = full[f"model.layers.{layer}.self_attn.k_proj"]
            scaling = 2.0  # alpha = 2 * rank
            assert torch.allclose(scaling * (b.double() @ a.double()), expected, atol=1e-6)
            # B's columns are orthogonal with norms sqrt(sigma / scaling), as in PEFT's PiSSA init.
            assert torch.allclose(b.double().norm(dim=0) ** 2, (s[sel] / scaling).flip(0).sort(descending=True).values, rtol=1e-5)


def test_pipeline_stages_initialise_only_their_layers(tp1):
    results = run_distributed(_model_worker, world=2, tp=1, pp=2, methods=["milora"], residuals=["branch"])
    ref = _gather_factors([tp1[0][("milora", "branch")]], 1)
    seen = []
    for stage, r in enumerate(results):
        names = list(r[("milora", "branch")]["factors"])
        assert all(n.startswith(f"model.layers.{stage}.") for n in names)
        seen += names
        got = _gather_factors([r[("milora", "branch")]], 1)
        for name in names:
            for g, e in zip(got[name], ref[name]):
                assert (g - e).abs().max() <= 1e-6
    assert sorted(seen) == sorted(ref)
