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


def test_the_global_scored_count_needs_no_collective():
    """Every rank holds every sample: the global batch's scored labels, counted on the host,
    equal the sum of each data-parallel shard's micro-batches (what an all-reduce gave)."""
    from milora_megatron.train.batches import SampleOrder, micro_batches, scored_labels

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (20, 9), generator=gen)
    masks = (torch.rand(20, 9, generator=gen) > 0.4).long()
    order = SampleOrder(20, seed=3)
    for position in (0, 16, 36):  # across an epoch boundary too
        shards = [order.step_indices(position, 8, r, 4) for r in range(4)]
        by_shard = sum(float(b.mask.sum()) for s in shards for b in micro_batches(tokens, masks, s, 1))
        assert scored_labels(masks, order.global_indices(position, 8)) == by_shard


def test_a_packed_mask_is_built_from_positions_where_they_are():
    from milora_megatron.train.batches import make_batch, packed_attention_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    batch = make_batch(torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 7), torch.cat([positions, positions[:, :1]], 1))
    mask = packed_attention_mask(positions)[0, 0]
    assert torch.equal(batch.attention_mask()[0, 0], mask)
    allowed = ~mask
    assert allowed[4].tolist() == [False, False, False, True, True, False]  # its own example, causally
    assert batch.to(torch.device("cpu")) is batch  # the CPU path moves nothing
