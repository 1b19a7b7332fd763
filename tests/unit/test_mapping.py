"""The one HF <-> megatron mapping: projection table, fused layouts, names (no megatron needed)."""

import pytest
import torch

from milora_megatron.mapping import HF_TARGETS, PAPER_TARGETS, PROJECTIONS, layer_layouts
from milora_megatron.mapping.decoder import HF_LAYER_NAMES, hf_to_megatron_layer, layout_of, megatron_to_hf_layer

HEADS, KV, HD, FFN, HIDDEN = 8, 2, 4, 12, 32


def _hf_layer(gen):
    dims = {"q_proj": (HEADS * HD, HIDDEN), "k_proj": (KV * HD, HIDDEN), "v_proj": (KV * HD, HIDDEN),
            "o_proj": (HIDDEN, HEADS * HD), "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN),
            "down_proj": (HIDDEN, FFN)}
    return {p: torch.randn(*d, generator=gen) for p, d in dims.items()}


def test_projection_table_and_layouts_agree():
    layouts = layer_layouts(HEADS, KV, HD, FFN, HIDDEN)
    pieces = {p: module for module, layout in layouts.items() for p, _ in layout.pieces}
    assert set(pieces) == set(HF_TARGETS) and set(PAPER_TARGETS) <= set(HF_TARGETS)
    for name, proj in PROJECTIONS.items():
        assert pieces[name] == proj.megatron_module
        assert layouts[proj.megatron_module].shard_dim == proj.shard_dim
    assert PROJECTIONS["q_proj"].hf_module(3) == "model.layers.3.self_attn.q_proj"
    assert set(HF_LAYER_NAMES) == {p.hf_weight for p in PROJECTIONS.values()} | {
        "input_layernorm.weight", "post_attention_layernorm.weight"}


def test_fused_layout_round_trip_and_tp_shards():
    """HF -> fused -> HF is exact; each TP rank's shard, read through its local layout, holds
    exactly that rank's rows of every HF matrix (q/k/v by query group, gate/up by rows) or
    columns (o/down), and the shards put together give the fused weight back."""
    gen = torch.Generator().manual_seed(0)
    hf = _hf_layer(gen)
    layouts = layer_layouts(HEADS, KV, HD, FFN, HIDDEN)
    for tp in (1, 2):
        for module, layout in layouts.items():
            fused = layout.fuse({p: hf[p] for p, _ in layout.pieces})
            assert all(torch.equal(hf[p], t) for p, t in layout.unfuse(fused).items())
            local = layout.local(tp)
            shards = [layout.shard(fused, tp, r) for r in range(tp)]
            together = torch.cat(shards, dim=layout.shard_dim)  # every entry in exactly one shard
            assert torch.equal(together.flatten().sort().values, fused.flatten().sort().values)
            for rank, shard in enumerate(shards):
                for p, _ in layout.pieces:
                    w = hf[p]
                    if layout.shard_dim == 1:
                        n = w.shape[1] // tp
                        expected = w[:, rank * n : (rank + 1) * n]
                    else:
                        n = w.shape[0] // tp
                        expected = w[rank * n : (rank + 1) * n]
                    got = local.view(shard, p).reshape(-1, shard.shape[1])
                    assert torch.equal(got, expected), (module, tp, rank, p)


def test_combine_interleaves_per_target_outputs():
    local = layer_layouts(HEADS, KV, HD, FFN, HIDDEN)["self_attention.linear_qkv"].local(2)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    w = torch.randn(local.rows, 5, generator=torch.Generator().manual_seed(2))
    per_target = {p: x @ local.view(w, p).reshape(-1, 5).t() for p, _ in local.pieces}
    assert torch.allclose(local.combine(per_target), x @ w.t())
    without_k = local.combine({p: y for p, y in per_target.items() if p != "k_proj"})
    k_rows = local.view(torch.arange(local.rows).unsqueeze(1).float(), "k_proj").reshape(-1).long()
    assert torch.equal(without_k[:, k_rows], torch.zeros(3, len(k_rows)))  # a missing target adds zeros


def test_layer_conversion_is_exact_both_ways():
    gen = torch.Generator().manual_seed(3)
    hf = {p.hf_weight: t for p, t in zip(PROJECTIONS.values(), _hf_layer(gen).values())}
    hf.update({"input_layernorm.weight": torch.randn(HIDDEN, generator=gen),
               "post_attention_layernorm.weight": torch.randn(HIDDEN, generator=gen)})
    layouts = layer_layouts(HEADS, KV, HD, FFN, HIDDEN)
    meg = hf_to_megatron_layer(hf, layouts)
    assert set(meg) == {"input_layernorm.weight", "pre_mlp_layernorm.weight", *(f"{m}.weight" for m in layouts)}
    back = megatron_to_hf_layer(meg, layouts)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    assert layout_of("decoder.layers.7.mlp.linear_fc1.weight", layouts) is layouts["mlp.linear_fc1"]
    assert layout_of("decoder.layers.7.input_layernorm.weight", layouts) is None


def test_tp_not_dividing_what_it_splits():
    layouts = layer_layouts(heads=4, kv_heads=2, head_dim=2, ffn=10, hidden=6)
    qkv, fc1 = layouts["self_attention.linear_qkv"], layouts["mlp.linear_fc1"]
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 2 query groups"):
        qkv.local(4)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 10 rows of gate_proj"):
        fc1.shard(torch.zeros(20, 6), 4, 0)
    with pytest.raises(ValueError, match=r"TP size 4 does not divide the 10 input columns"):
        layouts["mlp.linear_fc2"].shard(torch.zeros(6, 10), 4, 0)


def test_add_into_adds_each_target_at_its_rows_in_place():
    """adapters add their deltas into views of the linear's output: the same as adding
    combine()'s zero-padded delta, without building it (fc1 with only up_proj targeted)."""
    for module, tp in (("mlp.linear_fc1", 2), ("self_attention.linear_qkv", 2)):
        local = layer_layouts(HEADS, KV, HD, FFN, HIDDEN)[module].local(tp)
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(4, 3, local.rows, generator=gen)
        targets = [p for p, _ in local.pieces][1:]  # all but the first piece (gate, q)
        deltas = {p: torch.randn(4, 3, local.groups * rows, generator=gen) for p, rows in local.pieces if p in targets}
        expected = base + local.combine(deltas)
        out = base.clone()
        assert local.add_into(out, deltas) is out  # in place
        assert torch.equal(out, expected)
