"""Training samples as micro-batches, and the deterministic, resumable order in which a run
consumes them, sharded over data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s] inputs
    labels: torch.Tensor  # [b, s] next tokens
    mask: torch.Tensor  # [b, s] 1 where the label is scored
    positions: torch.Tensor | None = None  # [b, s] packed: each input's position in its own example

    def to(self, device: torch.device) -> "Batch":
        """The batch on ``device``: through pinned memory without blocking the host on a GPU
        (the step's micro-batches are moved once, before the schedule), as is on the CPU. A
        packed batch's attention mask is then built where its positions are, on the device."""
        if torch.device(device).type == "cpu":
            return self
        move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.mask), move(self.positions))

    def attention_mask(self) -> torch.Tensor | None:
        """Packed samples: see ``packed_attention_mask``. None: plain causal attention."""
        return None if self.positions is None else packed_attention_mask(self.positions)


def packed_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s], True where attention is NOT allowed (megatron's convention): across
    examples (positions restart at 0 per example) or to the future. Built on the device of
    ``positions``: nothing of size s x s crosses from the host."""
    example = torch.cumsum(positions == 0, dim=1)  # example index of every token
    s = example.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=example.device).triu(1)
    return ((example.unsqueeze(2) != example.unsqueeze(1)) | future).unsqueeze(1)


def make_batch(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> Batch:
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask[:, 1:].contiguous(),
                 None if positions is None else positions[:, :-1].contiguous())


def sample_parts(samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, masks, positions) of a samples tuple; positions None when it has none."""
    tokens, masks, *rest = samples
    return tokens, masks, (rest[0] if rest else None)


def micro_batches(tokens: torch.Tensor, masks: torch.Tensor, indices: list[int], micro_batch: int,
                  positions: torch.Tensor | None = None) -> list[Batch]:
    """The samples at ``indices``, in order, cut into micro-batches."""
    pick = lambda t, i: None if t is None else t[indices[i : i + micro_batch]]  # noqa: E731
    return [make_batch(pick(tokens, i), pick(masks, i), pick(positions, i)) for i in range(0, len(indices), micro_batch)]


def scored_labels(masks: torch.Tensor, indices: list[int]) -> float:
    """Scored label positions (mask 1, after the shift) of the samples at ``indices``: every
    rank holds every sample, so the global batch's count needs no collective."""
    return float(masks[indices][:, 1:].sum())


class SampleOrder:
    """Epoch-wise permutations seeded by (seed, epoch); a step's global batch is cut into
    data-parallel shards, each into micro-batches. Position = samples consumed (resumable)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._perm_epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=gen), epoch
        return int(self._perm[offset])

    def global_indices(self, position: int, global_batch: int) -> list[int]:
        """Every sample of the step's global batch (all data-parallel shards)."""
        return [self._index(p) for p in range(position, position + global_batch)]

    def step_indices(self, position: int, global_batch: int, dp_rank: int, dp_size: int) -> list[int]:
        per_rank = global_batch // dp_size
        start = position + dp_rank * per_rank
        return [self._index(p) for p in range(start, start + per_rank)]
