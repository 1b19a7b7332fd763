"""MiLoRA's initial factors at TP=2 on every registered family's tiny model (converted from
transformers' own, q/k/v and gate/up fused and sharded as megatron holds them) equal a
float64 SVD of each HF weight: B A is the weight's minor part, its singular values the r
smallest."""

import torch
from distributed import run_distributed
from hf_tiny import DENSE_FAMILIES, make_hf_model

# adapters on experts come with their own init test; here the dense families
FAMILIES = DENSE_FAMILIES

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
    out = {}
    for family, path in ckpts.items():
        base = BaseCheckpoint(path)
        model = build_gpt(base.shape, transformer_config(base.shape, tp=tp, perform_initialization=False))
        base.load_into(model, rank, tp)
        found = apply_adapters(model, AdapterConfig(method="milora", rank=RANK, alpha=RANK, dropout=0.0,
                                                    targets=TARGETS), tp_group=ps.get_tensor_model_parallel_group())
        out[family] = gather_factors(found, ps.get_tensor_model_parallel_group())
    return out


def test_milora_init_at_tp2_equals_float64_svd_for_every_family(tmp_path):
    from safetensors.torch import load_file

    from milora_megatron.convert.importer import convert_hf_to_megatron

    ckpts, weights = {}, {}
    for family in FAMILIES:
        make_hf_model(str(tmp_path / family), seed=11, family=family, layers=2, max_shard_size="50MB")
        weights[family] = load_file(str(tmp_path / family / "model.safetensors"))
        ckpts[family] = convert_hf_to_megatron(str(tmp_path / family), str(tmp_path / f"{family}_ckpt"), tp=2,
                                               progress=False)
    got = run_distributed(_factors, 2, tp=2, ckpts=ckpts)[0]
    for family in FAMILIES:
        factors = got[family]
        modules = {k.rsplit(".", 1)[0] for k in factors}
        assert len(modules) == 2 * len(TARGETS), (family, sorted(modules))
        for module in modules:
            w = weights[family][module + ".weight"].double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            minor = (u[:, -RANK:] * s[-RANK:]) @ vh[-RANK:]
            ba = factors[f"{module}.lora_B"].double() @ factors[f"{module}.lora_A"].double()
            err = ((ba - minor).norm() / minor.norm()).item()
            assert err <= 1e-5, (family, module, err)
            sv = torch.linalg.svdvals(ba)[:RANK]
            assert torch.allclose(sv, s[-RANK:], rtol=1e-5), (family, module)
