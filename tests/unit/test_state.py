"""milora_megatron/train/state.py: keep_last pruning of a run's checkpoints."""

import os

from milora_megatron.train.state import prune


def _run(tmp_path, steps, latest, partial=()):
    root = tmp_path / "checkpoints"
    for s in steps:
        (root / f"step_{s:07d}").mkdir(parents=True)
    for s in partial:
        (root / f"step_{s:07d}.partial").mkdir(parents=True)
    (root / "latest").write_text(f"step_{latest:07d}\n")
    return root


def test_keeps_the_newest_complete_checkpoints(tmp_path):
    root = _run(tmp_path, [2, 4, 6, 8], latest=8, partial=[10])
    prune(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_0000006", "step_0000008", "step_0000010.partial"]


def test_never_deletes_the_checkpoint_latest_names(tmp_path):
    root = _run(tmp_path, [2, 4, 6], latest=2)
    prune(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(root)) == ["latest", "step_0000002", "step_0000006"]
