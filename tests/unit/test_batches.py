"""milora_megatron/train/batches.py: the sample order (per-epoch permutations, data-parallel
shards, resumable from a position) and micro-batches."""

import torch

from milora_megatron.train.batches import SampleOrder, make_batch, micro_batches


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = SampleOrder(10, seed=3)
    epoch0 = order.step_indices(0, 10, dp_rank=0, dp_size=1)
    epoch1 = order.step_indices(10, 10, dp_rank=0, dp_size=1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert SampleOrder(10, seed=3).step_indices(0, 10, 0, 1) == epoch0  # same seed, same order
    assert SampleOrder(10, seed=4).step_indices(0, 10, 0, 1) != epoch0


def test_data_parallel_shards_partition_the_global_batch():
    order = SampleOrder(7, seed=1)
    whole = order.step_indices(5, 4, dp_rank=0, dp_size=1)  # crosses the epoch boundary at 7
    shards = [SampleOrder(7, seed=1).step_indices(5, 4, dp_rank=r, dp_size=2) for r in range(2)]
    assert shards[0] + shards[1] == whole


def test_resuming_at_a_position_gives_the_same_samples():
    straight = SampleOrder(9, seed=2)
    steps = [straight.step_indices(p, 3, 0, 1) for p in range(0, 27, 3)]
    resumed = SampleOrder(9, seed=2)  # a fresh object, as after a restart
    assert [resumed.step_indices(p, 3, 0, 1) for p in range(12, 27, 3)] == steps[4:]


def test_micro_batches_shift_labels_and_mask():
    tokens = torch.arange(20).view(4, 5)
    masks = torch.tensor([[0, 0, 1, 1, 1]] * 4, dtype=torch.float32)
    batches = micro_batches(tokens, masks, [3, 1, 2], micro_batch=2)
    assert [b.tokens.shape[0] for b in batches] == [2, 1]
    assert torch.equal(batches[0].tokens, tokens[[3, 1], :-1]) and torch.equal(batches[0].labels, tokens[[3, 1], 1:])
    assert torch.equal(batches[0].mask, masks[[3, 1], 1:])  # the mask scores the label positions
    b = make_batch(tokens[:1], masks[:1])
    assert b.tokens.is_contiguous() and b.labels.is_contiguous()


def test_packed_attention_stays_inside_each_example():
    from milora_megatron.train.batches import make_batch

    tokens = torch.arange(8).view(1, 8)
    positions = torch.tensor([[3, 4, 0, 1, 2, 0, 1, 2]])  # a cut example, then two whole ones
    batch = make_batch(tokens, torch.ones(1, 8), positions)
    blocked = batch.attention_mask()[0, 0]
    allowed = [[j for j in range(7) if not blocked[i, j]] for i in range(7)]
    assert allowed == [[0], [0, 1], [2], [2, 3], [2, 3, 4], [5], [5, 6]]
    assert make_batch(tokens, torch.ones(1, 8)).attention_mask() is None
