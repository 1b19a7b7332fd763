"""Gemma 3's 262k vocabulary (262,208 tokens, not a multiple of 128 x TP): padded to 262,400
at TP=2, the padded logits masked, so the gathered logits and megatron's vocab-parallel
cross-entropy (the trainer's loss) equal transformers' at that size."""

import torch
from distributed import run_distributed
from hf_tiny import make_hf_model

VOCAB = 262_208  # Gemma 3 4B/12B/27B's vocabulary


def _worker(ckpt, tokens, labels):
    from megatron.core import parallel_state as ps

    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, gather_logits, padded_vocab, transformer_config

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    base = BaseCheckpoint(ckpt)
    model = build_gpt(base.shape, transformer_config(base.shape, tp=tp)).eval()
    base.load_into(model, rank, tp)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = gather_logits(model, model(tokens, pos, None))
        loss = model(tokens, pos, None, labels=labels)  # [b, s]: megatron's vocab-parallel cross-entropy
    return {"logits": logits, "loss": loss, "padded": padded_vocab(VOCAB, tp),
            "local_rows": model.embedding.word_embeddings.weight.shape[0]}


def test_gemma3_vocabulary_is_exact_at_tp2(tmp_path):
    from milora_megatron.convert.importer import convert_hf_to_megatron

    model = make_hf_model(str(tmp_path / "hf"), family="gemma3", layers=2, vocab=VOCAB, seed=4, max_shard_size="200MB")
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, progress=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=gen)
    tokens[0, :3] = torch.tensor([VOCAB - 1, VOCAB - 2, 0])  # the last real rows, beside the padding
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        ref_logits = model(input_ids=tokens).logits.float()
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, VOCAB), labels.reshape(-1),
                                                 reduction="none").view_as(labels)
    got = run_distributed(_worker, 2, tp=2, ckpt=ckpt, tokens=tokens, labels=labels)[0]
    assert got["padded"] == 262_400 and got["local_rows"] == 131_200
    assert got["logits"].shape == ref_logits.shape  # the padding never leaves the model
    assert (got["logits"] - ref_logits).abs().max() <= 1e-4
    assert (got["loss"] - ref_loss).abs().max() <= 1e-4 * ref_loss.abs().max()
