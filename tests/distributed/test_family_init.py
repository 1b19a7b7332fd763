"""MiLoRA's initial factors at TP=2 on every registered family's tiny model (converted from
transformers' own, q/k/v and gate/up fused and sharded as megatron holds them) equal a
float64 SVD of each HF weight: B A is the weight's minor part, its singular values the r
smallest. The mixture-of-experts families' experts each have their own adapter, checked
the same way with the experts split over TP=2 (expert-TP) and over EP=2."""

import torch
from distributed import run_distributed
from hf_tiny import FAMILIES, MOE_FAMILIES, make_hf_model

RANK = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _factors(ckpts):
    from megatron.core import parallel_state as ps

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters
    from milora_megatron.checkpoint.adapters import gather_factors
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, transformer_config

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ep = ps.get_expert_model_parallel_world_size()
    out = {}
    for family, path in ckpts.items():
        base = BaseCheckpoint(path)
        model = build_gpt(base.shape, transformer_config(base.shape, tp=tp, ep=ep, perform_initialization=False))
        base.load_into(model, rank, tp)
        found = apply_adapters(model, AdapterConfig(method="milora", rank=RANK, alpha=RANK, dropout=0.0,
                                                    targets=TARGETS), tp_group=ps.get_tensor_model_parallel_group(),
                               dp_group=ps.get_data_parallel_group())
        out[family] = gather_factors(found, ps.get_tensor_model_parallel_group())
    return out


def _adapted_weights(weights: dict, family: str) -> set[str]:
    """The HF modules MiLoRA adapts: every target projection, each expert's own."""
    from milora_megatron.models.decoder import DecoderShape
    from milora_megatron.models.tiny_hf import family_config

    names = DecoderShape.from_hf_config(family_config(family).to_dict()).expert_names
    projections = set(TARGETS) | {names.projections[p] for p in ("gate_proj", "up_proj", "down_proj")}
    return {k[: -len(".weight")] for k in weights if k.endswith(".weight") and k.split(".")[-2] in projections}


def test_milora_init_at_tp2_equals_float64_svd_for_every_family(tmp_path):
    from safetensors.torch import load_file

    from milora_megatron.convert.importer import convert_hf_to_megatron

    ckpts, weights = {}, {}
    for family in FAMILIES:
        make_hf_model(str(tmp_path / family), seed=11, family=family, layers=2, max_shard_size="50MB")
        weights[family] = load_file(str(tmp_path / family / "model.safetensors"))
        ckpts[family] = convert_hf_to_megatron(str(tmp_path / family), str(tmp_path / f"{family}_ckpt"), tp=2,
                                               progress=False)
    got = {f"{family} TP2": factors for family, factors in run_distributed(_factors, 2, tp=2, ckpts=ckpts)[0].items()}
    moe = {f: p for f, p in ckpts.items() if f in MOE_FAMILIES}
    assert moe
    for rank_result in run_distributed(_factors, 2, ep=2, ckpts=moe):  # each rank: its own experts
        for family, factors in rank_result.items():
            got.setdefault(f"{family} EP2", {}).update(factors)
    for case, factors in got.items():
        family = case.split()[0]
        modules = {k.rsplit(".", 1)[0] for k in factors}
        assert modules == _adapted_weights(weights[family], family), case
        for module in modules:
            w = weights[family][module + ".weight"].double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            minor = (u[:, -RANK:] * s[-RANK:]) @ vh[-RANK:]
            ba = factors[f"{module}.lora_B"].double() @ factors[f"{module}.lora_A"].double()
            err = ((ba - minor).norm() / minor.norm()).item()
            assert err <= 1e-5, (case, module, err)
            sv = torch.linalg.svdvals(ba)[:RANK]
            assert torch.allclose(sv, s[-RANK:], rtol=1e-5), (case, module)


def _all_methods(ckpt):
    from megatron.core import parallel_state as ps

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters
    from milora_megatron.checkpoint.adapters import gather_factors
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, transformer_config

    base = BaseCheckpoint(ckpt)
    out = {}
    for method in ("lora", "pissa", "milora", "mica"):
        model = build_gpt(base.shape, transformer_config(base.shape, ep=ps.get_expert_model_parallel_world_size(),
                                                         perform_initialization=False))
        base.load_into(model)
        found = apply_adapters(model, AdapterConfig(method=method, rank=RANK, dropout=0.0,
                                                    targets=["gate_proj", "up_proj", "down_proj"],
                                                    moe_targets="experts"),
                               tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group())
        out[method] = gather_factors(found)
    return out


def test_every_method_initialises_experts_the_same_at_ep2_as_in_one_process(tmp_path):
    """LoRA, PiSSA, MiLoRA and MiCA on the experts only (``peft.moe_targets=experts``): the
    factors each EP=2 rank computes for its own experts are the one-process factors."""
    from milora_megatron.convert.importer import convert_hf_to_megatron

    make_hf_model(str(tmp_path / "hf"), seed=12, family="mixtral", layers=2, max_shard_size="50MB")
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ckpt"), progress=False)
    (single,) = run_distributed(_all_methods, 1, ckpt=ckpt)
    split = {m: {} for m in single}
    for rank_result in run_distributed(_all_methods, 2, ep=2, ckpt=ckpt):
        for method, factors in rank_result.items():
            split[method].update(factors)
    for method, factors in single.items():
        assert all(".block_sparse_moe.experts." in k for k in factors)  # attention untouched
        assert len(factors) == 2 * 4 * 3 * (4 if method in ("pissa", "milora") else 2)  # layers x experts x proj
        assert set(split[method]) == set(factors), method
        for key, tensor in factors.items():
            assert (split[method][key] - tensor).abs().max() <= 1e-6 * max(tensor.abs().max(), 1.0), (method, key)
