"""milora_megatron/train/run_folder.py: the run lock, what a resume may change, the plan's
refusals (the faults themselves run for real in tests/e2e/test_run_folder_faults.py)."""

import json
import os
import subprocess
import sys

import pytest

from milora_megatron.train.run_folder import RunFolderError, RunLock, RunLockedError, plan, resume_conflicts


def test_resume_conflicts_name_each_fixed_key():
    saved = {"peft": {"method": "milora", "rank": 32, "dropout": 0.05}, "train": {"seq_len": 512, "lr": 3e-4},
             "parallel": {"tp": 8}}
    now = {"peft": {"method": "lora", "rank": 32, "dropout": 0.1}, "train": {"seq_len": 512, "lr": 1e-4},
           "parallel": {"tp": 4}}
    assert resume_conflicts(saved, now) == ["peft.method: 'milora' -> 'lora'", "parallel.tp: 8 -> 4"]  # lr, dropout may change


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


def test_plan_refuses_an_unreadable_run_record(tmp_path):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="config.json is not valid JSON"):
        plan(str(tmp_path), {}, world_size=1, fresh_start=False)
    assert plan(str(tmp_path), {}, world_size=1, fresh_start=True)["resume"] is None
    assert [p for p in os.listdir(tmp_path) if p.startswith("previous-")]
