"""milora_megatron/train/schedule.py: linear warmup, then linear or cosine decay to min_lr."""

import math

import pytest

from milora_megatron.train.schedule import lr_at


def test_warmup_then_linear_decay():
    lrs = [lr_at(step, total=10, lr=1.0, warmup=4, schedule="linear") for step in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # step k of warmup: lr * (k + 1) / warmup
    assert lrs[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])  # to 0 over the 6 remaining steps


def test_cosine_decay_to_min_lr():
    lrs = [lr_at(step, total=9, lr=2.0, warmup=1, schedule="cosine", min_lr=0.5) for step in range(9)]
    assert lrs[0] == 2.0
    expected = [0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 8)) for s in range(1, 9)]
    assert lrs[1:] == pytest.approx(expected)
    assert lrs[-1] > 0.5 and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_and_past_the_end():
    assert lr_at(0, total=4, lr=1.0, warmup=0, schedule="linear") == 1.0
    assert lr_at(10, total=4, lr=1.0, warmup=0, schedule="linear", min_lr=0.1) == pytest.approx(0.1)  # clamped
    assert lr_at(0, total=1, lr=1.0, warmup=5, schedule="linear") == 0.2  # warmup longer than the run
