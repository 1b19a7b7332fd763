"""slurm/llama3_8b_milora.sh across two real Slurm nodes (network namespaces with their own
hostnames and addresses on one machine, tests/support/slurm_two_nodes.py): TP=2 inside each
node, data parallelism across them, torchrun's c10d rendezvous and gloo over the bridge.
The losses equal a one-node TP=2 x DP=2 run's; after SIGKILL of one node's trainers the job
fails, and resubmitting it resumes from the last good checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hf_tiny import alpaca_records, make_hf_model, make_tokenizer
from slurm_cluster import install
from slurm_two_nodes import TwoNodeSlurm, namespaces_unavailable

from paths import ROOT

SCRIPT = os.path.join(ROOT, "slurm", "llama3_8b_milora.sh")
SETTINGS = {"train.global_batch": 4, "train.micro_batch": 1, "train.seq_len": 128, "train.warmup": 1,
            "train.eval_every": 0, "peft.dropout": 0.0, "peft.rank": 4, "train.clip_grad": 0.05}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        install()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    why = namespaces_unavailable()
    if why:
        print(f"two-node Slurm test skipped: {why}")
        pytest.skip(f"this machine cannot host namespaced test nodes: {why}")
    work = tmp_path_factory.mktemp("slurm2")
    records = alpaca_records(48)
    make_hf_model(str(work / "hf"), tied=False, seed=3, vocab=512)
    make_tokenizer(str(work / "hf"), [json.dumps(r) for r in records] * 4, vocab=512)
    with open(work / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with TwoNodeSlurm(str(work / "cluster"), cpus_per_node=os.cpu_count()) as c:
        yield c, work


def _submit(c, work, out, extra):
    env = {"HF_MODEL": str(work / "hf"), "DATA": str(work / "train.jsonl"), "OUTPUT_DIR": str(out), "TP": "2",
           "PP": "1", "CONFIG": os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "GPUS_PER_NODE": "0",
           "GLOO_SOCKET_IFNAME": "eth0", "EXTRA_ARGS": " ".join(f"{k}={v}" for k, v in {**SETTINGS, **extra}.items())}
    log = str(out) + ".log"
    job = c.sbatch(["--nodes=2", "--gpus-per-node=0", f"--cpus-per-task={c.cpus}", f"--output={log}", SCRIPT],
                   env=env, cwd=ROOT)
    return job, log


def _records(run):
    path = os.path.join(run, "metrics.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def _tail(log):
    return open(log).read()[-4000:] if os.path.exists(log) else "no log"


def test_two_nodes_train_like_one_and_resume_after_a_node_is_killed(cluster):
    c, work = cluster
    out = work / "two"
    started = time.time()
    job, log = _submit(c, work, out, {"train.iters": 4})
    info = c.wait(job, timeout=400)
    assert info.get("JobState") == "COMPLETED", (info, _tail(log))
    text = open(log).read()
    assert "nodes=2 procs/node=2" in text and os.path.exists(out / "hf_merged" / "config.json")
    assert os.path.exists(out / "peft_adapter" / "adapter_config.json")
    two_nodes = [r["loss"] for r in _records(out / "run") if "loss" in r]
    elapsed_job = time.time() - started

    # the same run on one node: TP=2 x DP=2, 4 processes, plain torchrun
    one = work / "one"
    overrides = [f"{k}={v}" for k, v in {**SETTINGS, "train.iters": 4}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           os.path.join(ROOT, "launch", "pretrain_milora.py"), "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
           f"model.load={out / 'base_ckpt'}", "model.device=cpu", f"data.train={work / 'train.jsonl'}",
           f"output.dir={one}", "parallel.tp=2", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    one_node = [r["loss"] for r in _records(one) if "loss" in r]
    assert len(two_nodes) == len(one_node) == 4
    assert max(abs(a - b) / abs(b) for a, b in zip(two_nodes, one_node)) <= 1e-5, (two_nodes, one_node)

    # a fault across hosts: node2's trainer processes are killed mid-run
    out = work / "fault"
    iters = 24
    job, log = _submit(c, work, out, {"train.iters": iters, "output.save_every": 3})
    run = out / "run"
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= 5 and "loss" in r for r in _records(run)):
        assert time.time() < deadline and c.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _tail(log)
        time.sleep(0.3)
    mine = f"output.dir={run}"
    workers = [p for p in c.pids_on("node2", mine) if p not in c.pids_on("node2", "torchrun_usr1")]
    assert workers, "no trainer process found in node2's namespace"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    info = c.wait(job, timeout=200)
    assert info.get("JobState") == "FAILED", (info, _tail(log))
    before = _records(run)
    saved = [int(p.split("_")[1]) for p in os.listdir(run / "checkpoints") if p.startswith("step_") and "." not in p]
    last_good = max(saved)
    assert 3 <= last_good < iters

    job, log2 = _submit(c, work, out, {"train.iters": iters, "output.save_every": 3})  # the user's rerun
    info = c.wait(job, timeout=400)
    assert info.get("JobState") == "COMPLETED", (info, _tail(log2))
    records = _records(run)[len(before):]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] == last_good
    after = [r["step"] for r in records if "loss" in r]
    assert after == list(range(last_good + 1, iters + 1))  # each remaining step once, from the checkpoint on
    first = [r["step"] for r in before if "loss" in r]
    assert first == list(range(1, len(first) + 1)) and first[-1] >= last_good
    print(f"two-node job {elapsed_job:.0f} s")
