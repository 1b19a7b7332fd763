"""milora_megatron/train/evaluation.py without process groups: the evaluation samples each
data-parallel rank takes (padded to the same micro-batches everywhere, the padding unscored)
and the vocabulary-parallel log-softmax on one rank."""

from types import SimpleNamespace

import torch

from milora_megatron.train.evaluation import eval_micro_batches, vocab_parallel_log_softmax


def _samples(n: int, length: int = 6):
    tokens = torch.arange(n * length).reshape(n, length)
    return tokens, torch.ones(n, length)


def test_ranks_split_the_samples_and_pad_to_the_same_micro_batches():
    tokens, masks = _samples(8)
    per_rank = [eval_micro_batches(tokens, masks, count=7, micro_batch=3, groups=SimpleNamespace(dp_size=2, dp_rank=r))
                for r in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]  # ceil(7 / (2 x 3)) micro-batches of 3 on each rank
    scored = [torch.cat([b.tokens[b.mask.sum(1) > 0][:, 0] for b in batches]).tolist() for batches in per_rank]
    assert sorted(scored[0] + scored[1]) == [i * 6 for i in range(7)]  # each of the 7 once, none twice
    # rank 0 holds samples 0, 2, 4, 6 and rank 1 samples 1, 3, 5: 12 places, 5 of them unscored padding
    assert [int((b.mask.sum(1) == 0).sum()) for b in per_rank[0] + per_rank[1]] == [0, 2, 0, 3]


def test_fewer_samples_than_asked_are_all_taken_once():
    tokens, masks = _samples(3)
    batches = eval_micro_batches(tokens, masks, count=10, micro_batch=2, groups=SimpleNamespace(dp_size=1, dp_rank=0))
    assert sum(int((b.mask.sum(1) > 0).sum()) for b in batches) == 3


def test_one_rank_log_softmax_is_torchs():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    got = vocab_parallel_log_softmax(logits, tp_group=None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log_softmax(logits.float(), dim=-1))
