"""data.pack=true: a packed sample's per-token losses equal those of its examples run one
by one (fp32, TP=2): attention never crosses examples."""

import numpy as np
import torch
from distributed import run_distributed


def _examples():
    gen = np.random.default_rng(0)
    out = []
    for length, prompt in ((6, 2), (9, 4), (5, 1), (7, 3)):
        ids = gen.integers(3, 200, size=length)
        mask = np.ones(length, np.float32)
        mask[:prompt] = 0
        out.append((ids, mask))
    return out


def _worker():
    from megatron.core import parallel_state as ps

    from milora_megatron.data import to_samples
    from milora_megatron.models.decoder import DecoderShape, build_gpt, transformer_config
    from milora_megatron.train.batches import micro_batches
    from milora_megatron.train.pipeline import forward

    shape = DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=200, max_seq=64)
    model = build_gpt(shape, transformer_config(shape, tp=ps.get_tensor_model_parallel_world_size())).eval()
    examples = _examples()
    total = sum(len(e[0]) for e in examples)
    tokens, masks, positions = to_samples(examples, total - 1, pad_id=0, pack=True)
    assert positions is not None and tokens.shape == (1, total)
    with torch.no_grad():
        packed = forward(model, micro_batches(tokens, masks, [0], 1, positions)[0], labels=True)[0]
        alone = []
        for e in examples:
            t, m, _ = to_samples([e], len(e[0]) - 1, pad_id=0, pack=False)
            alone.append(forward(model, micro_batches(t, m, [0], 1)[0], labels=True)[0])
        causal = forward(model, micro_batches(tokens, masks, [0], 1)[0], labels=True)[0]  # today's packing
    return {"packed": packed, "alone": alone, "label_mask": masks[0, 1:], "causal": causal}


def test_packed_losses_equal_unpacked():
    result = run_distributed(_worker, 2, tp=2)[0]
    packed, mask = result["packed"], result["label_mask"]
    start, compared = 0, 0
    for loss in result["alone"]:
        n = loss.shape[0]  # an example of length L has L - 1 labels
        scored = mask[start : start + n] > 0
        a, b = packed[start : start + n][scored], loss[scored]
        assert torch.allclose(a, b, rtol=1e-5, atol=0), (a, b)
        compared += int(scored.sum())
        start += n + 1  # + the label that crosses into the next example (not scored)
    assert compared == int(mask.sum()) > 10
    # without the per-example mask (one causal sequence) later examples see earlier ones
    later = (mask > 0) & (torch.arange(mask.shape[0]) > 6)
    assert (result["causal"][later] - packed[later]).abs().max() > 1e-3
