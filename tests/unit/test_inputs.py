"""milora_megatron/train/inputs.py without process groups: where validation comes from, the
held-out fraction, and the resume check of a Hub dataset's commit."""

from types import SimpleNamespace

import pytest

from milora_megatron.errors import DataError, RunFolderError
from milora_megatron.train.inputs import check_same_data, hold_out, resolve_sources


def _data(tmp_path, **keys):
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "valid.jsonl").write_text('{"instruction": "c", "output": "d"}\n')
    fields = {"train": str(tmp_path / "train.jsonl"), "valid": "", "revision": "", "subset": "", "split": "train",
              "valid_split": "", "valid_fraction": 0.0, "columns": {}}
    return SimpleNamespace(**{**fields, **keys})


def test_validation_comes_from_a_split_another_dataset_or_nowhere(tmp_path):
    train, valid = resolve_sources(_data(tmp_path, valid_split="test", columns={"q": "instruction"}))
    assert (valid.name, valid.split, valid.columns) == (train.name, "test", (("q", "instruction"),))
    train, valid = resolve_sources(_data(tmp_path, valid=str(tmp_path / "valid.jsonl")))
    assert valid.name.endswith("valid.jsonl") and valid.split == "train"
    assert resolve_sources(_data(tmp_path))[1] is None


def test_the_held_out_fraction_is_seeded_disjoint_and_in_order():
    examples = list(range(100))
    kept, held = hold_out(examples, 0.1, seed=3)
    assert len(held) == 10 and held == sorted(held) and sorted(kept + held) == examples
    assert hold_out(examples, 0.1, seed=3) == (kept, held) and hold_out(examples, 0.1, seed=4)[1] != held
    assert len(hold_out(examples[:5], 0.01, seed=0)[1]) == 1  # at least one example
    with pytest.raises(DataError, match="leaves nothing to train on"):
        hold_out(examples[:1], 0.5, seed=0)


def test_a_resume_must_find_the_recorded_commit():
    recorded = {"train": {"name": "acme/qa", "commit": "a" * 40}}
    check_same_data(recorded, {"train": {"name": "acme/qa", "commit": "a" * 40}})
    check_same_data(None, {"train": {"name": "acme/qa", "commit": "b" * 40}})  # a run from before the record
    check_same_data({"train": {"name": "t.jsonl"}}, {"train": {"name": "t.jsonl"}})  # a local file has no commit
    with pytest.raises(RunFolderError, match=f"now resolves to commit {'b' * 40}, and this run was trained on "
                                             f"{'a' * 40}: resume with data.revision={'a' * 40}"):
        check_same_data(recorded, {"train": {"name": "acme/qa", "commit": "b" * 40}})
