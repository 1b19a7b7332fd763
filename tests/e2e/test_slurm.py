"""slurm/llama3_8b_milora.sh under a real Slurm (slurmctld + slurmd + munge on localhost):
`sbatch --gpus-per-node=0` with the tiny model and GPUS_PER_NODE=0 converts, trains, exports
and leaves the checkpoints; `scancel --signal=USR1` (what --signal=USR1@120 sends before the
time limit) makes the trainer save and the job requeue itself and finish from that checkpoint."""

import json
import os
import subprocess
import time

import pytest
from hf_tiny import alpaca_records, make_hf_model, make_tokenizer
from slurm_cluster import LocalSlurm, install

from paths import ROOT  # noqa: E402
SCRIPT = os.path.join(ROOT, "slurm", "llama3_8b_milora.sh")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        install()
    except RuntimeError as exc:  # not root / no apt: say so instead of failing obscurely
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("slurm")
    with LocalSlurm(str(work / "cluster")) as c:
        yield c, work
    # the daemons are stopped by the context; nothing of theirs may be left running
    for name in ("slurmctld", "slurmd"):
        pid = open(c.pidfiles[name]).read().strip() if os.path.exists(c.pidfiles[name]) else None
        if pid:
            assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0, f"{name} still runs"


@pytest.fixture(scope="module")
def inputs(cluster):
    _, work = cluster
    records = alpaca_records(48)
    hf = work / "hf"
    make_hf_model(str(hf), tied=False, seed=3, vocab=512)
    make_tokenizer(str(hf), [json.dumps(r) for r in records] * 4, vocab=512)
    with open(work / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return hf, work / "train.jsonl"


def _submit(c, out_dir, hf, data, extra):
    env = {"HF_MODEL": str(hf), "DATA": str(data), "OUTPUT_DIR": str(out_dir), "TP": "2", "PP": "1",
           "CONFIG": os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "GPUS_PER_NODE": "0",
           "EXTRA_ARGS": " ".join(f"{k}={v}" for k, v in extra.items())}
    log = os.path.join(str(out_dir) + ".log")
    # the README's CPU submission: no GPUs, and CPUs per task that this node has
    job = c.sbatch(["--gpus-per-node=0", f"--cpus-per-task={c.cpus}", f"--output={log}", SCRIPT], env=env, cwd=ROOT)
    return job, log


def _metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tail(log, n=4000):
    return open(log).read()[-n:] if os.path.exists(log) else "no log"


def _check_outputs(out, log, steps):
    text = open(log).read()
    assert os.path.exists(out / "base_ckpt" / "milora_base.json"), text[-3000:]
    latest = open(out / "run" / "checkpoints" / "latest").read().strip()
    assert latest == f"step_{steps:07d}", (latest, text[-3000:])
    assert os.path.exists(out / "run" / "checkpoints" / latest / "adapter.json")
    assert os.path.exists(out / "hf_merged" / "config.json"), text[-3000:]
    assert any(n.endswith(".safetensors") for n in os.listdir(out / "hf_merged"))
    peft = json.load(open(out / "peft_adapter" / "adapter_config.json"))
    assert peft["r"] == 2 * 4 and peft["target_modules"]  # MiLoRA exports rank 2r
    assert "done: merged HF model" in text
    return text


def test_sbatch_convert_train_export(cluster, inputs):
    c, work = cluster
    hf, data = inputs
    out = work / "plain"
    job, log = _submit(c, out, hf, data, {"train.iters": 6, "output.save_every": 3, "peft.rank": 4,
                                          "train.eval_every": 0})
    info = c.wait(job, timeout=300)
    text = open(log).read() if os.path.exists(log) else ""
    assert info.get("JobState") == "COMPLETED", (info, text[-3000:])
    _check_outputs(out, log, 6)
    losses = [m["loss"] for m in _metrics(out / "run") if "loss" in m]
    assert len(losses) == 6 and all(l == l for l in losses)
    assert "TP=2" in text and "procs/node=2" in text and "device=cpu" in text


def test_usr1_saves_requeues_and_resumes(cluster, inputs):
    c, work = cluster
    hf, data = inputs
    out = work / "signal"
    iters = 60
    job, log = _submit(c, out, hf, data, {"train.iters": iters, "output.save_every": 0, "peft.rank": 4,
                                          "train.eval_every": 0})
    run = out / "run"
    deadline = time.time() + 240
    while not any(m.get("step", 0) >= 3 and "loss" in m for m in _metrics(run)):
        assert time.time() < deadline, open(log).read()[-3000:] if os.path.exists(log) else "no log"
        state = c.job(job)
        if state.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {state.get('JobState')} before step 3:\n{_tail(log, 8000)}")
        time.sleep(0.5)
    signalled = c.run(["scancel", "--signal=USR1", str(job)])
    assert signalled.returncode == 0, signalled.stderr
    # Slurm holds a requeued job for ~2 minutes (its begin time is pushed back); start it
    # sooner so the test does not sit idle. Not at once: slurmd revokes the first run's
    # credential at the requeue, and refuses a relaunch whose credential is from the same
    # second ("Job credential revoked": the job then FAILS). Everything else is the job's own doing.
    released, pending_since = [], []

    def finished(j):
        if j.get("JobState") == "PENDING" and int(j.get("Restarts", 0)) >= 1 and not released:
            pending_since.append(time.time())
            if time.time() - pending_since[0] >= 3.0:
                released.append(c.run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode)
        return j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    info = c.wait(job, timeout=400, until=finished)
    text = open(log).read()
    assert info.get("JobState") == "COMPLETED", (info, text[-4000:])
    assert int(info.get("Restarts", 0)) >= 1, info
    records = _metrics(run)
    stopped = [m for m in records if m.get("event") == "stopped"]
    assert stopped and "SIGUSR1" in stopped[0]["reason"], records[-5:]
    stop_step = stopped[0]["step"]
    assert 3 <= stop_step < iters
    steps = [m["step"] for m in records if "loss" in m]
    # every step trained exactly once: the requeued job resumed after the saved step
    assert steps == list(range(1, iters + 1)), steps
    assert "requeueing to resume" in text
    _check_outputs(out, log, iters)


@pytest.mark.parametrize("env,nproc,device", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4, "cuda"),  # follows the allocation when GPUS_PER_NODE is unset
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "2"}, 2, "cuda"),
    ({}, 2, "cpu"),  # no GPUs allocated: CPU + gloo, TP x PP processes
])
def test_script_follows_the_allocation(tmp_path, env, nproc, device):
    """The script's launch line, with srun/scontrol/python stubbed: processes per node from
    SLURM_GPUS_ON_NODE, and srun given the job's CPUs per task (Slurm >= 22.05 drops them)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "srun.txt"
    (stubs / "srun").write_text(f'#!/bin/sh\necho "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK $*" >> {record}\n')
    (stubs / "scontrol").write_text("#!/bin/sh\n[ \"$1\" = show ] && echo node1\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    (out / "base_ckpt").mkdir(parents=True)
    (out / "base_ckpt" / "milora_base.json").write_text("{}")  # conversion done: skipped
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "GPUS_PER_NODE"}
    run = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, cwd=ROOT, env={
        **clean, "PATH": f"{stubs}:{os.environ['PATH']}", "HF_MODEL": "hf", "DATA": "d.jsonl", "OUTPUT_DIR": str(out),
        "TP": "2", "SLURM_CPUS_PER_TASK": "7", "SLURM_JOB_ID": "5", **env})
    assert run.returncode == 0, run.stderr
    line = record.read_text()
    assert line.startswith("SRUN_CPUS_PER_TASK=7 ")
    assert f"--nproc_per_node {nproc} " in line and f"model.device={device} " in line
    assert f"procs/node={nproc} device={device}" in run.stdout
