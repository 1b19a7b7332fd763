"""What a run folder guarantees, under real faults: no checkpoint is lost or silently
overwritten, a damaged or diverged checkpoint is never used, one run at a time, and errors
arrive as one line before the expensive work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from damage import flip
from paths import ROOT
from trainer_runs import TORCHRUN_WRAPPER, common, last_losses, make_inputs, records, run, torchrun, workers


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    return root, make_inputs(root)


@pytest.fixture(scope="module")
def saved(inputs, tmp_path_factory):
    """Run folders trained once for the tests that damage, resume or refuse them; each test
    takes its own copy (``saved(name, dest)``). "every 2": 4 steps saved every 2, 3 kept;
    "every 1": 2 steps saved at each."""
    root = tmp_path_factory.mktemp("saved")
    settings = {"every 2": {"train.iters": 4, "output.save_every": 2, "output.keep_last": 3},
                "every 1": {"train.iters": 2, "output.save_every": 1}}
    for name, extra in settings.items():
        run(1, _args(inputs, root / name, **extra))

    def copy(name, dest):
        shutil.copytree(root / name, dest)
        return dest

    return copy


def _args(inputs, out, **extra):
    root, ckpt = inputs
    return common(root, ckpt, out, **{"parallel.tp": 1, "train.global_batch": 2, "train.seq_len": 128, **extra})


def _events(out, name):
    return [r for r in records(out) if r.get("event") == name]


def _trained_after_resume(out):
    """The steps trained after the last "resumed" event."""
    recs = records(out)
    last = max(i for i, r in enumerate(recs) if r.get("event") == "resumed")
    return [r["step"] for r in recs[last:] if "loss" in r]


def test_a_deleted_latest_pointer_loses_nothing(inputs, saved, tmp_path):
    out = saved("every 2", tmp_path / "run")
    (out / "checkpoints" / "latest").unlink()
    run(1, _args(inputs, out, **{"train.iters": 6, "output.save_every": 2, "output.keep_last": 3}))
    assert _events(out, "resumed")[-1]["from"].endswith("step_0000004")
    assert _trained_after_resume(out) == [5, 6]  # before the fix: steps 1..6 again, checkpoints overwritten
    assert sorted(last_losses(out)) == list(range(1, 7))
    # a resume may change train.iters: it is named, and the run's record follows it
    resumed = _events(out, "resumed")[-1]
    moved = [c for c in resumed["changed"] if not c.startswith("output.dir:")]  # the folder is a copy
    assert moved == ["train.iters: 4 -> 6"] and resumed["total_steps"] == 6
    assert json.loads((out / "config.json").read_text())["train"]["iters"] == 6
    assert json.loads((out / "run.json").read_text())["total_steps"] == 6


def test_a_damaged_newest_checkpoint_falls_back_and_says_so(inputs, saved, tmp_path):
    from milora_megatron.convert.exporter import export_merged

    out = saved("every 2", tmp_path / "run")
    flip(out / "checkpoints" / "step_0000004" / "adapter-stage000.safetensors")
    with pytest.raises(ValueError, match="does not match its checksum"):  # before: exported weights of 5e3
        export_merged(str(out / "checkpoints" / "step_0000004"), str(tmp_path / "merged"), progress=False)
    run(1, _args(inputs, out, **{"train.iters": 6, "output.save_every": 2, "output.keep_last": 3}))
    resumed = _events(out, "resumed")[-1]
    assert resumed["from"].endswith("step_0000002")
    assert "step_0000004" in resumed["notes"][0] and "checksum" in resumed["notes"][0]
    assert _trained_after_resume(out) == [3, 4, 5, 6]


def test_unusable_checkpoints_are_never_overwritten_without_the_flag(inputs, saved, tmp_path):
    out = saved("every 1", tmp_path / "run")
    for step in (1, 2):
        (out / "checkpoints" / f"step_{step:07d}" / "adapter.json").unlink()
    before = records(out)
    text = run(1, _args(inputs, out, **{"train.iters": 4}), ok=False)
    assert run.returncode != 0 and "holds checkpoints but none is complete and verified" in text
    assert (out / "checkpoints" / "step_0000002").is_dir() and records(out) == before  # untouched
    run(1, _args(inputs, out, **{"train.iters": 2, "output.fresh_start": "true"}))
    previous = [p for p in os.listdir(out) if p.startswith("previous-")]
    assert len(previous) == 1 and (out / previous[0] / "checkpoints" / "step_0000002").is_dir()
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]


_KILL_BETWEEN_RENAMES = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from milora_megatron.adapters import AdapterConfig
from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint

class Base:
    path = fingerprint = "base"

def write(value):
    write_adapter_checkpoint(step_dir({run!r}, 3), {{"m.lora_A": torch.full((2, 4), value),
                             "m.lora_B": torch.full((4, 2), value)}}, AdapterConfig(), Base(), step=3)

write(1.0)
if {kill}:
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if dst.endswith(".replaced"):
            real(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)  # between setting the old copy aside and renaming the new one in
        return real(src, dst)
    os.replace = replace
    write(2.0)
"""


def test_a_kill_while_a_step_is_resaved_leaves_a_complete_copy(tmp_path):
    from milora_megatron.checkpoint.adapters import newest_complete

    run_dir = tmp_path / "run"
    code = _KILL_BETWEEN_RENAMES.format(root=ROOT, run=str(run_dir), kill=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (run_dir / "checkpoints" / "step_0000003").exists()  # the window: no step_3 folder at all
    chosen, skipped = newest_complete(str(run_dir))
    assert chosen is not None and chosen.path.endswith("step_0000003.replaced") and not skipped
    assert float(chosen.tensors()["m.lora_A"][0, 0]) == 1.0  # the complete previous copy


def test_a_resume_that_would_change_the_method_is_refused_up_front(inputs, saved, tmp_path):
    out = saved("every 1", tmp_path / "run")
    start = time.time()
    text = run(1, _args(inputs, out, **{"train.iters": 4, "peft.method": "lora"}), ok=False)
    assert run.returncode != 0
    assert "a resume cannot change (peft.method: 'milora' -> 'lora')" in text
    assert "subspaces" not in text and time.time() - start < 60  # refused before the model and the SVD init
    text = run(1, _args(inputs, out, **{"train.iters": 4, "peft.rank": 8, "peft.targets": "[q_proj]"}), ok=False)
    assert run.returncode != 0 and "(peft.rank: 4 -> 8; peft.alpha: 4.0 -> 8.0; peft.targets:" in text
    assert "subspaces" not in text
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]


def test_diverged_factors_are_never_saved_nor_exported(inputs, tmp_path):
    import torch

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.convert.exporter import export_merged

    out = tmp_path / "run"
    text = run(1, _args(inputs, out, **{"train.iters": 3, "output.save_every": 1, "train.lr": 1e10,
                                        "train.warmup": 0, "train.clip_grad": 0}), ok=False)
    assert run.returncode != 0 and "adapter factors diverged" in text and "not saved" in text
    assert not [p for p in os.listdir(out / "checkpoints") if p.startswith("step_")] if (out / "checkpoints").exists() else True
    # a checkpoint written elsewhere with exploded factors is refused by the exporter
    base = BaseCheckpoint(inputs[1])
    name = "model.layers.0.self_attn.q_proj"
    factors = {f"{name}.lora_A": torch.full((4, 64), 8e9), f"{name}.lora_B": torch.full((64, 4), 8e9)}
    write_adapter_checkpoint(step_dir(str(tmp_path / "hand"), 1), factors, AdapterConfig(method="lora", rank=4), base, 1)
    with pytest.raises(ValueError, match="refusing to export .* factors diverged"):
        export_merged(str(tmp_path / "hand"), str(tmp_path / "merged"), progress=False)


def test_one_run_per_folder_and_workers_stop_with_their_launcher(inputs, tmp_path):
    out = tmp_path / "run"
    first = torchrun(1, _args(inputs, out, **{"train.iters": 500}))
    deadline = time.time() + 120
    while not any("loss" in r for r in records(out)):
        assert time.time() < deadline and first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.1)
    text = run(1, _args(inputs, out, **{"train.iters": 500}), ok=False)
    assert run.returncode != 0 and "is in use by pid" in text  # before: trained concurrently, both exit 0
    pids = workers(out, first.pid)
    os.kill(first.pid, signal.SIGKILL)  # the launcher only
    first.communicate()
    deadline = time.time() + 120
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/status").read().find("State:\tZ") < 0 for p in pids):
        assert time.time() < deadline, "the workers kept training after their launcher died"
        time.sleep(0.2)
    stopped = _events(out, "stopped")
    assert stopped and "SIGTERM" in stopped[-1]["reason"]  # they saved on the way out
    step = stopped[-1]["step"]
    run(1, _args(inputs, out, **{"train.iters": step + 2}))  # the lock of the dead run does not block
    assert _trained_after_resume(out) == [step + 1, step + 2]


def test_a_damaged_base_checkpoint_is_refused_before_training(inputs, tmp_path):
    base = shutil.copytree(inputs[1], tmp_path / "ckpt")
    flip(base / "layer-00001.safetensors", count=64)
    root = inputs[0]
    text = run(1, common(root, str(base), tmp_path / "run", **{"parallel.tp": 1, "train.seq_len": 128}), ok=False)
    assert run.returncode != 0 and "the base checkpoint is damaged" in text and "layer-00001" in text
    assert not [r for r in records(tmp_path / "run") if "loss" in r]  # before: trained on it


@pytest.mark.parametrize("case", ["missing field", "not a checkpoint"])
def test_errors_are_one_line_before_the_expensive_work(inputs, tmp_path, case):
    root, ckpt = inputs
    extra = {}
    if case == "missing field":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
        extra["data.train"] = str(bad)
    else:
        extra["model.load"] = str(root / "hf")
    proc = torchrun(2, common(root, ckpt, tmp_path / "run", **{"parallel.tp": 2, "train.seq_len": 128, **extra}),
                    launcher=TORCHRUN_WRAPPER)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    ours = [line for line in text.splitlines() if line.startswith("pretrain_milora: error:")]
    assert len(ours) == 1, text[-3000:]  # one line, from one rank
    assert ("line 2: missing field(s) ['output']" if case == "missing field" else "is not a converted base") in ours[0]
    assert "Traceback" not in text and "subspaces" not in text  # no tracebacks; before the SVD init


def _wait_for_training(proc, out, first_checkpoint=False):
    deadline = time.time() + 120
    ready = ((lambda: any((out / "checkpoints").glob("step_*/adapter.json"))) if first_checkpoint
             else (lambda: any("loss" in r for r in records(out))))
    while not ready():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("launcher,how", [("wrapper", "SIGTERM to the launcher"), ("wrapper", "Ctrl-C"),
                                          ("torchrun", "Ctrl-C")])
def test_a_stop_signal_or_ctrl_c_saves_and_says_so(inputs, tmp_path, launcher, how):
    """Ctrl-C is SIGINT to the terminal's process group (the launcher's: torchrun's workers sit
    in sessions of their own); the launcher passes it on and the workers save, as for SIGTERM."""
    out = tmp_path / "run"
    proc = torchrun(1, _args(inputs, out, **{"train.iters": 500}),
                    launcher=TORCHRUN_WRAPPER if launcher == "wrapper" else None, start_new_session=True)
    _wait_for_training(proc, out)
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    stopped = _events(out, "stopped")
    assert stopped and ("SIGINT" if how == "Ctrl-C" else "SIGTERM") in stopped[-1]["reason"], text[-3000:]
    step = stopped[-1]["step"]
    assert (out / "checkpoints" / f"step_{step:07d}" / "adapter.json").exists()  # before: Ctrl-C saved nothing
    assert f"(step {step}) after a stop signal" in text and "the save succeeded" in text
    if launcher == "wrapper":
        assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]  # plain torchrun: exit 1
    if how == "Ctrl-C" and launcher == "wrapper":  # the save is a checkpoint to resume from (once: a launch costs)
        run(1, _args(inputs, out, **{"train.iters": step + 1}))
        assert _trained_after_resume(out) == [step + 1]


_SECOND_CTRL_C = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from milora_megatron.train.signals import StopSignals

stop = StopSignals()
os.kill(os.getpid(), signal.SIGINT)
assert stop.received == "SIGINT"
with stop.saving_checkpoint():
    os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while a checkpoint is written
    time.sleep(0.2)
    open({done!r}, "w").write("the save completed")
print("not reached: the second Ctrl-C aborts once the save is complete")
"""


def test_a_second_ctrl_c_aborts_but_never_cuts_a_save_short(tmp_path):
    done = tmp_path / "saved"
    proc = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C.format(root=ROOT, done=str(done))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert done.read_text() == "the save completed"
    assert "a checkpoint is being written; aborting as soon as it is complete" in proc.stderr
    assert "aborted without saving" in proc.stderr and "not reached" not in proc.stdout


_KILL_DURING_FIRST_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import milora_megatron.checkpoint.atomic as atomic
from milora_megatron.adapters import AdapterConfig
from milora_megatron.checkpoint.adapters import step_dir, write_adapter_checkpoint

class Base:
    path = fingerprint = "base"

def killed(_tmp):
    os.kill(os.getpid(), signal.SIGKILL)  # the files are written, the folder not yet renamed into place
atomic._fsync_tree = killed
write_adapter_checkpoint(step_dir({run!r}, 1), {{"m.lora_A": torch.ones(2, 4)}}, AdapterConfig(), Base(), step=1)
"""


def test_an_interrupted_first_save_does_not_block_the_rerun(inputs, tmp_path):
    from milora_megatron.train.run_folder import claim

    out = tmp_path / "run"
    claim(str(out))  # the folder of a run killed during its first save
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_FIRST_SAVE.format(root=ROOT, run=str(out))],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and (out / "checkpoints" / "step_0000001.partial").is_dir()
    text = run(1, _args(inputs, out, **{"train.iters": 2}))  # before: "none is complete and verified ()"
    assert "an interrupted save, not a checkpoint" in text and "starts from the beginning" in text
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]
    assert not (out / "checkpoints" / "step_0000001.partial").exists()


def test_a_folder_that_is_not_a_run_folder_is_never_written(inputs, tmp_path):
    root, ckpt = inputs
    hf = shutil.copytree(root / "hf", tmp_path / "hf")
    before = {p: (hf / p).read_bytes() for p in os.listdir(hf)}
    start = time.time()
    text = run(1, _args(inputs, hf, **{"train.iters": 2}), ok=False, launcher=TORCHRUN_WRAPPER)
    ours = [line for line in text.splitlines() if line.startswith("pretrain_milora: error:")]
    assert run.returncode != 0 and len(ours) == 1 and "is not empty and is not a run folder" in ours[0], text[-3000:]
    assert "Traceback" not in text and time.time() - start < 60
    assert {p: (hf / p).read_bytes() for p in os.listdir(hf)} == before  # before: config.json replaced


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) to fill; root can mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk test needs one")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(folder):
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(inputs, small_disk):
    from milora_megatron.checkpoint.adapters import AdapterCheckpoint

    out = small_disk / "run"
    proc = torchrun(1, _args(inputs, out, **{"train.iters": 500, "output.save_every": 1, "output.keep_last": 1,
                                             "output.tensorboard": "false"}), launcher=TORCHRUN_WRAPPER)
    _wait_for_training(proc, out, first_checkpoint=True)
    _fill(small_disk)
    text, _ = proc.communicate(timeout=120)
    ours = [line for line in text.splitlines() if line.startswith("pretrain_milora: error:")]
    assert proc.returncode != 0 and len(ours) == 1, text[-3000:]
    assert "no space left on device" in ours[0] and str(out) in ours[0] and "Traceback" not in text
    (small_disk / "filler").unlink()
    kept = AdapterCheckpoint(str(out), verify=True)  # the last complete checkpoint is intact
    assert kept.step >= 1 and not [p for p in os.listdir(out / "checkpoints") if p.endswith(".partial")]


def test_a_run_folder_written_before_checksums_still_resumes(inputs, saved, tmp_path):
    """Version-1 adapter checkpoints (no checksums) are read, unverified, and said to be."""
    out = saved("every 1", tmp_path / "run")
    meta_path = out / "checkpoints" / "step_0000002" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 1
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    run(1, _args(inputs, out, **{"train.iters": 3}))
    resumed = _events(out, "resumed")[-1]
    assert resumed["from"].endswith("step_0000002") and "predates checksums" in resumed["notes"][0]
