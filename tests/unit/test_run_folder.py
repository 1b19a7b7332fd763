"""milora_megatron/train/run_folder.py: the run lock, what a resume may change, the plan's
refusals (the faults themselves run for real in tests/e2e/test_run_folder_faults.py)."""

import json
import os
import subprocess
import sys

import pytest

from milora_megatron.train.run_folder import (MARKER, RunFolderError, RunLock, RunLockedError, changed_keys, claim,
                                              plan, resume_conflicts)


def test_resume_conflicts_name_each_fixed_key():
    saved = {"peft": {"method": "milora", "rank": 32, "dropout": 0.05}, "train": {"seq_len": 512, "lr": 3e-4},
             "parallel": {"tp": 8}}
    now = {"peft": {"method": "lora", "rank": 32, "dropout": 0.1}, "train": {"seq_len": 512, "lr": 1e-4},
           "parallel": {"tp": 4}}
    assert resume_conflicts(saved, now) == ["peft.method: 'milora' -> 'lora'"]  # lr, dropout, the layout may change


def test_one_lock_per_folder_and_stale_locks_are_taken_over(tmp_path):
    lock = RunLock(str(tmp_path))
    assert lock.acquire() is None
    assert RunLock(str(tmp_path)).acquire() is None  # the same process may take its own lock again
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {**lock.record, "pid": other.pid, "started": None}
        (tmp_path / "run.lock").write_text(json.dumps(record))
        with pytest.raises(RunLockedError, match=f"in use by pid {other.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        other.kill()
        other.wait()
    note = RunLock(str(tmp_path)).acquire()  # its holder is gone
    assert note.startswith(f"took over a stale lock of pid {other.pid}")
    far = {"pid": 1, "host": "another-host", "started": 0.0, "heartbeat": 0.0}
    (tmp_path / "run.lock").write_text(json.dumps(far))
    assert "another-host" in RunLock(str(tmp_path)).acquire()  # its heartbeat is 15 minutes old


def test_a_killed_holder_not_yet_reaped_holds_no_lock(tmp_path):
    """A SIGKILLed run whose parent has not reaped it yet (a zombie) is dead: its lock is taken
    over (before: a rerun right after the kill was refused as a second run)."""
    lock = RunLock(str(tmp_path))
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        started = psutil.Process(killed.pid).create_time()
        (tmp_path / "run.lock").write_text(json.dumps({**lock.record, "pid": killed.pid, "started": started}))
        killed.kill()
        while psutil.Process(killed.pid).status() != psutil.STATUS_ZOMBIE:  # dead, not reaped
            pass
        assert RunLock(str(tmp_path)).acquire().startswith(f"took over a stale lock of pid {killed.pid}")
    finally:
        killed.kill()
        killed.wait()


def test_plan_refuses_an_unreadable_run_record(tmp_path):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="config.json is not valid JSON"):
        plan(str(tmp_path), {}, world_size=1, fresh_start=False)
    assert plan(str(tmp_path), {}, world_size=1, fresh_start=True).resume is None
    assert [p for p in os.listdir(tmp_path) if p.startswith("previous-")]


def test_another_layout_needs_the_layout_independent_state(tmp_path):
    """A checkpoint with only per-rank state (saved before it had optimizer-stage files)
    resumes at its own layout only; with the files, any layout."""
    import types

    import torch

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint
    from milora_megatron.train.state import optimizer_file, rank_file

    from dataclasses import asdict

    base = types.SimpleNamespace(path="/nowhere", fingerprint="f")
    config = {"peft": asdict(AdapterConfig(method="lora")), "parallel": {"tp": 2, "pp": 1}}

    def extra(folder):
        for r in range(2):
            open(os.path.join(folder, rank_file(r)), "w").write("state")
        return [rank_file(0), rank_file(1)]

    write_adapter_checkpoint(step_dir(str(tmp_path), 2), {"m.lora_A": torch.zeros(2, 2)}, AdapterConfig(method="lora"),
                             base, 2, extra_writer=extra)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "tp": 2, "pp": 1}))
    assert plan(str(tmp_path), config, world_size=2, fresh_start=False).relayout is False
    now = {**config, "parallel": {"tp": 1, "pp": 1}}
    with pytest.raises(RunFolderError, match=r"TP=2 x PP=1 x DP=1 \(2 processes\), this run is TP=1 x PP=1 x DP=2 "
                                             r"\(2 processes\), and its checkpoints predate"):
        plan(str(tmp_path), now, world_size=2, fresh_start=False)

    def extra_v2(folder):
        from safetensors.torch import save_file

        save_file({"m.lora_A.exp_avg": torch.zeros(2, 2)}, os.path.join(folder, optimizer_file(0)))
        return extra(folder) + [optimizer_file(0)]

    write_adapter_checkpoint(step_dir(str(tmp_path), 4), {"m.lora_A": torch.zeros(2, 2)}, AdapterConfig(method="lora"),
                             base, 4, extra_writer=extra_v2)
    decided = plan(str(tmp_path), now, world_size=2, fresh_start=False)
    assert decided.relayout and decided.resume.endswith("step_0000004") and decided.saved_stages == 1


def test_a_run_writes_only_into_a_new_empty_or_run_folder(tmp_path):
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (hf / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(RunFolderError, match=r"is not empty and is not a run folder \(it holds config.json, "
                                             r"model.safetensors; no run.json\)"):
        claim(str(hf))
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]  # nothing written into it
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        claim(str(tmp_path / "a_file"))
    claim(str(tmp_path / "new" / "run"))  # a new folder (and its parents) is made and marked
    assert (tmp_path / "new" / "run" / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim(str(empty))
    (empty / "metrics.jsonl").write_text("")
    claim(str(empty))  # marked: a run's own folder, however much it holds
    older = tmp_path / "older"  # a run folder written before the marker existed
    older.mkdir()
    (older / "run.json").write_text("{}")
    (older / "config.json").write_text("{}")
    claim(str(older))
    assert (older / MARKER).is_file()


def _checkpoint(run, step, config, files=None):
    import types

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint
    from milora_megatron.train.state import rank_file

    def extra(folder):
        open(os.path.join(folder, rank_file(0)), "w").write("state")
        return [rank_file(0)]

    write_adapter_checkpoint(step_dir(str(run), step), {"m.lora_A": __import__("torch").zeros(2, 2)},
                             AdapterConfig(**config["peft"]), types.SimpleNamespace(path="/b", fingerprint="f"), step,
                             extra_writer=extra, run_config=config)


def test_an_interrupted_first_save_is_not_a_checkpoint(tmp_path):
    partial = tmp_path / "checkpoints" / "step_0000004.partial"
    partial.mkdir(parents=True)
    (partial / "adapter-stage000.safetensors").write_bytes(b"half")
    decided = plan(str(tmp_path), {}, world_size=1, fresh_start=False)
    assert decided.resume is None
    assert "step_0000004.partial: an interrupted save, not a checkpoint" in decided.notes[0]
    assert "starts from the beginning" in decided.notes[0] and not partial.exists()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004\n")  # a pointer to nothing
    assert plan(str(tmp_path), {}, world_size=1, fresh_start=False).resume is None


def test_what_a_resume_may_not_change_is_checked_against_the_checkpoint(tmp_path):
    """config.json gone (or replaced): the checkpoint's own record still refuses another method."""
    from dataclasses import asdict

    from milora_megatron.adapters import AdapterConfig

    config = {"peft": asdict(AdapterConfig(method="milora", rank=4, alpha=4.0)), "train": {"lr": 3e-4, "iters": 4},
              "parallel": {"tp": 1, "pp": 1}}
    _checkpoint(tmp_path, 2, config)
    lora = {**config, "peft": {**config["peft"], "method": "lora"}}
    with pytest.raises(RunFolderError, match=r"a resume cannot change \(peft.method: 'milora' -> 'lora'\)"):
        plan(str(tmp_path), lora, world_size=1, fresh_start=False)  # no config.json at all
    (tmp_path / "config.json").write_text(json.dumps(lora))  # a config.json that agrees with the change
    with pytest.raises(RunFolderError, match=r"peft.method: 'milora' -> 'lora'"):
        plan(str(tmp_path), lora, world_size=1, fresh_start=False)
    (tmp_path / "config.json").unlink()
    later = {**config, "train": {"lr": 1e-4, "iters": 8}}
    decided = plan(str(tmp_path), later, world_size=1, fresh_start=False)
    assert decided.resume.endswith("step_0000002")
    assert decided.changed == ["train.iters: 4 -> 8", "train.lr: 0.0003 -> 0.0001"]


def test_changed_keys_lists_every_difference():
    assert changed_keys({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3, "z": 0}}) == ["a.y: 2 -> 3", "a.z: None -> 0"]
