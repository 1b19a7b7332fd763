"""Real training runs for the end-to-end tests: a tiny converted Llama with its data, and
launch/pretrain_milora.py on it.

``torchrun`` starts the trainer as users do (torchrun, or the USR1-forwarding wrapper): the
tests of launching, signals and the launcher's own behaviour use it. ``run`` starts the same
program's ranks forked from the suite's fork server (forkserver.py), with the environment
torchrun gives its workers, and waits for them: the same code from ``main()`` on, without the
launcher's and the imports' start-up (seconds per rank) that most of a short run would be.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback

from forkserver import CONTEXT, adopt
from hf_tiny import alpaca_records, make_hf_model, make_tokenizer
from paths import ROOT

LAUNCH = os.path.join(ROOT, "launch", "pretrain_milora.py")
TORCHRUN_WRAPPER = os.path.join(ROOT, "launch", "torchrun_usr1.py")


def make_inputs(root, family: str = "llama", chat_template: str | None = None, **shape) -> str:
    """A tiny HF model (Llama unless ``family`` says otherwise; its tokenizer with
    ``chat_template`` when given) converted at TP2 x PP2 under ``root``, train/valid jsonl and
    general text beside it; returns the base checkpoint's path."""
    from milora_megatron.convert.importer import convert_hf_to_megatron

    records = alpaca_records(48)
    texts = [json.dumps(r) for r in records] * 4
    make_hf_model(str(root / "hf"), seed=7, vocab=512, family=family, **shape)
    make_tokenizer(str(root / "hf"), texts, vocab=512)
    if chat_template:
        (root / "hf" / "chat_template.jinja").write_text(chat_template)
    ckpt = convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), tp=2, pp=2, progress=False)
    with open(root / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(root / "valid.jsonl", "w") as f:
        for r in alpaca_records(8, seed=1):
            f.write(json.dumps(r) + "\n")
    (root / "general.txt").write_text(" ".join(texts[:20]))
    return ckpt


def torchrun(nproc, overrides, env=None, launcher=None, **kwargs):
    """Popen of torchrun (or ``launcher``, e.g. TORCHRUN_WRAPPER) running the trainer."""
    start = [sys.executable, launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*start, "--standalone", "--nproc_per_node", str(nproc), LAUNCH,
           "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def common(root, ckpt, out, **extra) -> list[str]:
    """key=value overrides of a short, deterministic run."""
    items = {"model.load": ckpt, "data.train": str(root / "train.jsonl"), "output.dir": str(out),
             "train.iters": 5, "train.global_batch": 4, "train.micro_batch": 1, "train.seq_len": 256,
             "train.warmup": 1, "train.eval_every": 0, "peft.dropout": 0.0, "peft.rank": 4,
             "train.clip_grad": 0.05, "output.save_every": 0, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def run(nproc, overrides, ok=True, env=None, **kwargs) -> str:
    """A finished run's output (``run.returncode``: 0, or 1 as torchrun's when a rank failed);
    by default asserting it exited 0. With torchrun's arguments (``launcher``, Popen's), a
    torchrun; otherwise ranks forked from the fork server (``forked``)."""
    if kwargs:
        proc = torchrun(nproc, overrides, env=env, **kwargs)
        text, _ = proc.communicate(timeout=300)
        code = proc.returncode
    else:
        text, code = forked(nproc, overrides, env)
    if ok:
        assert code == 0, text[-3000:]
    run.returncode = code
    return text


def forked(nproc, overrides, env=None, timeout=300.0, config=None) -> tuple[str, int]:
    """(output of rank 0, then the others'; 0 or 1) of the trainer on ``nproc`` forked ranks.
    A rank that fails ends the others, as torchrun ends its workers."""
    import tempfile

    argv = ["--config", config or os.path.join(ROOT, "configs", "tiny_cpu.yaml"), *overrides]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1"}
    with tempfile.TemporaryDirectory() as logs:
        paths = [os.path.join(logs, f"rank{r}.log") for r in range(nproc)]
        ranks = [CONTEXT.Process(target=_rank, args=(r, argv, base, paths[r])) for r in range(nproc)]
        for p in ranks:
            p.start()
        deadline, failed_at = time.time() + timeout, None
        while any(p.is_alive() for p in ranks):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in ranks):
                failed_at = time.time()
            if time.time() > deadline or (failed_at is not None and time.time() - failed_at > 5):
                for p in ranks:
                    if p.is_alive():
                        p.kill()
            time.sleep(0.05)
        for p in ranks:
            p.join()
        text = "".join(open(path, errors="replace").read() for path in paths if os.path.exists(path))
        timed_out = time.time() > deadline
    code = 0 if all(p.exitcode == 0 for p in ranks) else 1
    assert not timed_out, f"the run did not finish in {timeout} s:\n{text[-3000:]}"
    return text, code


def _rank(rank: int, argv: list[str], env: dict, log: str) -> None:
    """One rank: torchrun's environment, output to ``log``, the trainer's entry point."""
    adopt({**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"})
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [LAUNCH, *argv]
    code = 0
    try:
        runpy.run_path(LAUNCH, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def records(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def last_losses(out) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def workers(out, launcher_pid) -> list[int]:
    """The trainer processes of a run (torchrun starts them in sessions of their own)."""
    found = subprocess.run(["pgrep", "-f", f"pretrain_milora.py.*output.dir={out}"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split() if int(p) != launcher_pid]
