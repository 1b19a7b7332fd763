"""data.pack=true: a packed sample's per-token losses equal those of its examples run one
by one (fp32, TP=2): attention never crosses examples, with full attention and with
windowed layers (window 3, shorter than every example, beside full ones as in Gemma 3):
the window and the per-example mask together."""

import pytest

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


WINDOWED = dict(sliding_window=3, layer_types=("sliding_attention", "full_attention"), local_rope_theta=1e4)


def _worker(windowed):
    from megatron.core import parallel_state as ps

    from milora_megatron.data import to_samples
    from milora_megatron.models.decoder import DecoderShape, build_gpt, transformer_config
    from milora_megatron.train.batches import micro_batches
    from milora_megatron.train.pipeline import forward

    shape = DecoderShape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=200, max_seq=64,
                         **(WINDOWED if windowed else {}))
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
        full = None
        if windowed:  # the same weights without the window: the window changes the losses
            shape.sliding_window = None
            unwindowed = build_gpt(shape, transformer_config(shape, tp=ps.get_tensor_model_parallel_world_size()))
            unwindowed.load_state_dict(model.state_dict())
            full = forward(unwindowed.eval(), micro_batches(tokens, masks, [0], 1, positions)[0], labels=True)[0]
    return {"packed": packed, "alone": alone, "label_mask": masks[0, 1:], "causal": causal, "full": full}


@pytest.mark.parametrize("windowed", [False, True])
def test_packed_losses_equal_unpacked(windowed):
    result = run_distributed(_worker, 2, tp=2, windowed=windowed)[0]
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
    if windowed:
        assert (result["full"][mask > 0] - packed[mask > 0]).abs().max() > 1e-3
