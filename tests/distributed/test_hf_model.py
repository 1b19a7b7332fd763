"""The megatron model built from an HF config.json and a converted checkpoint gives the HF
model's logits (fp32), at TP1, TP2, PP2 and TP2xPP2, tied and untied, vocab 1000 (padded),
for every registered family (models/families/: Qwen2's q/k/v biases, Qwen3's q/k norms,
Mistral's window and Gemma 3's local and global layers all shorter or different than the
16-token sequences need, and the mixture-of-experts families' routers and experts), each
built by transformers from its own tiny config."""

import pytest
import torch
from distributed import run_distributed
from hf_tiny import FAMILIES, hf_logits, make_hf_model

TOL = 1e-4


def _logits_worker(ckpts, tokens, sp=False, ep=1):
    from megatron.core import parallel_state as ps
    from pipeline_forward import forward_logits

    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, transformer_config

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    out = {}
    for key, path in ckpts.items():
        base = BaseCheckpoint(path)
        ep_here = ep if base.shape.experts else 1  # the dense models of the same run ignore it
        model = build_gpt(base.shape, transformer_config(base.shape, tp=tp, pp=pp, sp=sp, ep=ep_here))
        base.load_into(model, rank, tp)
        out[key] = forward_logits(model, tokens)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from milora_megatron.convert.importer import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("hf_model")
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    refs, ckpts = {}, {}
    models = [("untied", "llama", False), ("tied", "llama", True)]
    models += [(family, family, None) for family in FAMILIES if family != "llama"]  # as each family ties
    for key, family, tied in models:
        model = make_hf_model(str(root / key), tied=tied, seed=len(refs), family=family)
        refs[key] = hf_logits(model, tokens)
        ckpts[key] = convert_hf_to_megatron(str(root / key), str(root / f"{key}_ckpt"), tp=2, pp=2, progress=False)
    return tokens, refs, ckpts


@pytest.mark.parametrize("tp,pp,sp,ep", [(1, 1, False, 1), (2, 1, False, 1), (2, 1, True, 1), (1, 2, False, 1),
                                         (2, 2, False, 1), (1, 1, False, 2), (2, 1, True, 2)])
def test_logits_match_hf(converted, tp, pp, sp, ep):
    """``ep``: the MoE models' experts over that many expert-parallel ranks (each holding
    its own experts; tokens travel by megatron's all-to-all), and over TP=2 ranks as well
    (megatron's default expert-TP is TP)."""
    tokens, refs, ckpts = converted
    world = tp * pp * ep
    results = run_distributed(_logits_worker, world, tp=tp, pp=pp, ep=ep, ckpts=ckpts, tokens=tokens, sp=sp)
    last = results[-1]  # the last global rank is on the last stage
    for key, ref in refs.items():
        assert ref.std() > 0.3, "reference logits too small for a meaningful comparison"
        got = last[key]
        assert got.shape == ref.shape  # vocabulary padding stripped
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"{key} TP{tp} PP{pp} SP{sp} EP{ep}: max |diff| {diff:.2e}"
