"""Stand-ins for a converted checkpoint and a dataset, for timing the real trainer on shapes
nobody wants to download (the throughput benchmark, the GPU check)."""

from __future__ import annotations

import torch

from ..models.decoder import DecoderShape


class RandomBase:
    """Random base weights, drawn on the model's device: N(0, 0.02) for matrices and
    embeddings (megatron's init scale), ones for norms. Nothing is read from disk."""

    path = "random-weights"
    fingerprint = "random-weights"

    def __init__(self, shape: DecoderShape, seed: int = 0):
        self.shape, self.seed = shape, seed

    def is_the_base_of(self, recorded_fingerprint: str) -> bool:
        return recorded_fingerprint == self.fingerprint

    @torch.no_grad()
    def load_into(self, model, tp_rank: int = 0, tp_size: int = 1) -> None:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(self.seed * 1000 + tp_rank)
        for name, param in model.named_parameters():
            if ".adapters." in name:
                continue
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)


def random_tokens(n: int, seq_len: int, vocab: int, seed: int):
    """(tokens, loss mask) of ``n`` random sequences, every position scored."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (n, seq_len + 1), generator=gen)
    return tokens, torch.ones(n, seq_len + 1)
