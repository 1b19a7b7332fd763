"""What ML engineers expect around the trainer: TensorBoard event files and W&B (offline) from
a real run, a model given by its Hub id (offline, from a cache laid out here), the installed
commands, and the run plot."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from trainer_runs import common, losses, make_inputs, records

from paths import ROOT

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    return root, make_inputs(root)


def test_tensorboard_and_wandb_offline_from_a_run(tiny, tmp_path):
    """Through ``torchrun -m milora_megatron.train`` (the installed module entry point)."""
    root, ckpt = tiny
    out = tmp_path / "run"
    overrides = common(root, ckpt, out, **{"train.iters": 3, "parallel.tp": 1, "output.wandb_project": "milora-test",
                                           "data.valid": str(root / "valid.jsonl"), "train.eval_batches": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "milora_megatron.train", "--config", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/valid_loss", "init/init_s"} <= tags
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert all(abs(v - ref) <= 1e-6 * abs(ref) for (_, v), ref in zip(logged, losses(out)))
    valid = [r["valid_loss"] for r in records(out) if r.get("event") == "eval"]
    assert abs(events.Scalars("eval/valid_loss")[-1].value - valid[-1]) <= 1e-6 * valid[-1]

    run_id = (out / "wandb_id").read_text().strip()
    offline = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-") and d.endswith(run_id)]
    assert len(offline) == 1 and any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / offline[0]))


def _hub_cache(hf_dir, cache, repo, commit):
    """The layout huggingface_hub's cache uses: refs/main -> commit, snapshots/<commit>/files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(hf_dir, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_a_hub_id_converts_offline_and_records_its_commit(tiny, tmp_path):
    root, ckpt = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(root / "hf", tmp_path / "hub", "acme/tiny-llama", commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    convert = [os.path.join(BIN, "milora-hf-to-megatron"), "--hf-dir", "acme/tiny-llama", "--quiet"]
    for name, extra in (("main", []), ("pinned", ["--revision", commit])):
        proc = subprocess.run([*convert, "--out", str(tmp_path / name), *extra], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        manifest = json.loads((tmp_path / name / "milora_base.json").read_text())
        assert manifest["source"]["hub"] == {"repo_id": "acme/tiny-llama", "revision": extra[-1] if extra else "main",
                                             "commit": commit}
    from milora_megatron.checkpoint.base import BaseCheckpoint

    assert BaseCheckpoint(str(tmp_path / "main")).fingerprint == BaseCheckpoint(ckpt).fingerprint  # the same weights
    proc = subprocess.run([*convert, "--out", str(tmp_path / "v9"), "--revision", "v9"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2 and "acme/tiny-llama is not a local path, and the model (revision v9) is not in the " \
                                    "Hugging Face cache" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert not (tmp_path / "v9").exists()


def test_installed_commands_and_the_run_plot(tiny, tmp_path):
    root, ckpt = tiny
    for command in ("milora-hf-to-megatron", "milora-megatron-to-hf", "milora-spectrum", "milora-forgetting",
                    "milora-plot-run"):
        proc = subprocess.run([os.path.join(BIN, command), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-500:])
    proc = subprocess.run([sys.executable, "-m", "milora_megatron.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "peft.init_cache" in proc.stdout

    from trainer_runs import run

    runs = []
    for method in ("milora", "lora"):
        out = tmp_path / method
        run(1, common(root, ckpt, out, **{"train.iters": 3, "parallel.tp": 1, "peft.method": method,
                                          "output.tensorboard": "false"}))
        assert not (out / "tensorboard").exists()
        runs.append(str(out))
    png = tmp_path / "compare.png"
    proc = subprocess.run([os.path.join(BIN, "milora-plot-run"), *runs, "--out", str(png)], capture_output=True, text=True)
    assert proc.returncode == 0 and png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    from milora_megatron.analysis.run_curves import read_run

    curves = read_run(runs[0])
    assert curves["loss"] == ([1, 2, 3], losses(runs[0])) and "milora r=4" in curves["label"]
    proc = subprocess.run([os.path.join(BIN, "milora-plot-run"), str(tmp_path / "nothing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "run folder" in proc.stderr and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([os.path.join(BIN, "milora-plot-run"), str(tmp_path / "empty")], capture_output=True, text=True)
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr
