"""The trainer end to end on a tiny converted Llama: TP2 x PP2 (with and without SP) gives
TP=1's loss sequence, resume after a kill continues it exactly, SIGTERM saves, iters=0 saves
the initial adapters, and the loss is on response tokens only."""

import json
import os
import shutil
import signal
import time

import pytest
import torch
from trainer_runs import common, last_losses, losses, make_inputs, records, run, torchrun, workers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, make_inputs(root)


def _evals(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["valid_loss"], r["forgetting_loss"]) for r in map(json.loads, f) if r.get("event") == "eval"]


def test_tp2_pp2_matches_tp1(setup, tmp_path):
    """Training losses and the final validation / forgetting losses. Micro-batches of 3 over 8
    validation samples leave a ragged last micro-batch (and DP=2 uneven shards): evaluation
    pads with zero-mask samples so pipeline shapes stay fixed and the result is unchanged."""
    root, ckpt = setup
    ev = {"train.micro_batch": 3, "train.global_batch": 6, "train.eval_batches": 3,
          "data.valid": str(root / "valid.jsonl"), "data.forgetting": str(root / "general.txt")}
    ref = tmp_path / "tp1"
    run(1, common(root, ckpt, ref, **{"parallel.tp": 1, "parallel.pp": 1, **ev}))
    expected, expected_evals = losses(ref), _evals(ref)
    assert len(expected) == 5 and expected[-1] < expected[0] and len(expected_evals) == 1
    # independent reference for the in-run (vocab-parallel, per micro-batch) forgetting loss:
    # the analysis tool on the exported PEFT adapter, through transformers, same windows
    from milora_megatron.analysis.forgetting import general_text_metrics, load_pair
    from milora_megatron.convert.exporter import export_peft

    export_peft(str(ref), str(tmp_path / "peft"))
    pair = load_pair(str(root / "hf"), adapter_dir=str(tmp_path / "peft"), device="cpu", dtype="float32")
    tool = general_text_metrics(pair, str(root / "general.txt"), seq_len=256, batch_size=3, max_windows=9, progress=False)
    assert abs(tool["forgetting_loss"] - expected_evals[0][1]) <= 1e-5 * expected_evals[0][1], (tool, expected_evals)
    runs = [(4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.sp": sp}) for sp in ("false", "true")]
    runs.append((2, {"parallel.tp": 1, "parallel.pp": 1}))  # DP=2
    for nproc, par in runs:
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        run(nproc, common(root, ckpt, out, **par, **ev))
        got = losses(out)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
        assert rel <= 1e-5, (par, got, expected)
        for a, b in zip(_evals(out)[0], expected_evals[0]):
            assert abs(a - b) / abs(b) <= 1e-5, (par, _evals(out), expected_evals)


def test_resume_after_kill_continues_exactly(setup, tmp_path):
    root, ckpt = setup
    extra = {"train.iters": 12, "train.global_batch": 8, "output.save_every": 3, "parallel.tp": 1, "peft.dropout": 0.05}
    run(1, common(root, ckpt, tmp_path / "straight", **extra))
    expected = last_losses(tmp_path / "straight")
    out = tmp_path / "killed"
    proc = torchrun(1, common(root, ckpt, out, **extra))
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    for pid in workers(out, proc.pid) + [proc.pid]:  # torchrun starts workers in their own sessions
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed_at = max(last_losses(out))
    assert killed_at < 12, "the run finished before it could be killed"
    run(1, common(root, ckpt, out, **extra))
    got = last_losses(out)
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # bit-identical in fp32 on CPU, dropout included
    inits = [r for r in records(out) if r.get("event") == "init"]
    assert inits[0]["factors_from"] == "init" and sum(inits[0]["eigensolves_per_rank"]) == 4 * 5  # layers x targets
    assert inits[-1]["factors_from"] == "checkpoint" and inits[-1]["eigensolves_per_rank"] == [0]  # a resume solves nothing


def test_resume_in_merge_mode_continues_exactly(setup, tmp_path):
    """Merge mode writes W - s B0 A0 into W; a resume rebuilds that from the checkpoint's B0,
    A0 (no SVD) and continues bit-identically."""
    root, ckpt = setup
    extra = {"train.iters": 4, "output.save_every": 2, "output.keep_last": 3, "parallel.tp": 2,
             "peft.residual": "merge", "train.seq_len": 128}
    run(2, common(root, ckpt, tmp_path / "straight", **extra))
    expected = last_losses(tmp_path / "straight")
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", out)  # the same run, so far
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # as if the run had stopped after step 2
    run(2, common(root, ckpt, out, **extra))
    assert [r for r in records(out) if r.get("event") == "resumed"][-1]["from"].endswith("step_0000002")
    assert last_losses(out) == expected


def test_sigterm_saves_and_exits_cleanly(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "term"
    proc = torchrun(1, common(root, ckpt, out, **{"train.iters": 500, "parallel.tp": 1}))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    pids = workers(out, proc.pid)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text[-2000:]
    assert "after a stop signal" in text
    step = max(last_losses(out))
    assert step < 500
    assert (out / "checkpoints" / f"step_{step:07d}" / "adapter.json").exists()


def test_zero_iterations_saves_initial_adapters(setup, tmp_path):
    from milora_megatron.checkpoint.adapters import AdapterCheckpoint

    root, ckpt = setup
    out = tmp_path / "zero"
    run(2, common(root, ckpt, out, **{"train.iters": 0, "parallel.tp": 2}))
    saved = AdapterCheckpoint(str(out))
    assert saved.meta["step"] == 0
    factors = saved.tensors()
    a = [k for k in factors if k.endswith(".lora_A")]
    assert len(a) == 4 * 5  # 4 layers x paper targets
    for key in a:
        assert torch.equal(factors[key], factors[key + "0"])  # A == A0 before any step


def test_recompute_and_reduced_precision(setup, tmp_path):
    """train.recompute=selective|full (megatron's own activation recompute; the frozen
    embedding's output is made to require grad so a recomputed layer passes gradients to its
    adapters) gives the same steps as none, dropout included; model.dtype=bf16 and fp16 (with
    its loss scale) train the fp32 master factors to nearly the fp32 losses."""
    root, ckpt = setup

    def steps(name, **extra):
        out = tmp_path / name
        run(2, common(root, ckpt, out, **{"parallel.tp": 2, "train.iters": 3, "peft.dropout": 0.05,
                                            "train.seq_len": 128, **extra}))
        return [r for r in records(out) if "loss" in r]

    reference = steps("none")
    key = [(r["loss"], r["grad_norm"]) for r in reference]
    for mode in ("selective", "full"):
        assert [(r["loss"], r["grad_norm"]) for r in steps(mode, **{"train.recompute": mode})] == key, mode
    for dtype in ("bf16", "fp16"):
        got = steps(dtype, **{"model.dtype": dtype})
        for r, ref in zip(got, reference):
            assert abs(r["loss"] - ref["loss"]) <= 2e-3 * ref["loss"], (dtype, got, reference)
        assert all(("loss_scale" in r) == (dtype == "fp16") for r in got)
    recorded = json.loads((tmp_path / "fp16" / "run.json").read_text())
    assert recorded["dtype"] == "float16" and recorded["device"] == "cpu"




def test_init_cache_serves_another_layout_and_method(setup, tmp_path):
    """A MiLoRA run at TP=2 fills peft.init_cache; a MiCA run (the same minor side) at TP=1
    then solves nothing and trains exactly as a MiCA run without the cache."""
    root, ckpt = setup
    cache = {"peft.init_cache": str(tmp_path / "cache"), "train.iters": 3}
    run(2, common(root, ckpt, tmp_path / "filler", **{"parallel.tp": 2, **cache}))
    fill = [r for r in records(tmp_path / "filler") if r.get("event") == "init"][0]
    assert fill["factors_from"] == "init" and sum(fill["eigensolves_per_rank"]) == 4 * 5
    assert fill["cache_misses_per_rank"] == [20, 20] and fill["cache_hits_per_rank"] == [0, 0]
    mica = {"peft.method": "mica", "parallel.tp": 1, "train.iters": 3}
    cache = {"peft.init_cache": cache["peft.init_cache"]}
    run(1, common(root, ckpt, tmp_path / "reader", **mica, **cache))
    read = [r for r in records(tmp_path / "reader") if r.get("event") == "init"][0]
    assert read["factors_from"] == "cache" and read["eigensolves_per_rank"] == [0] and read["cache_hits_per_rank"] == [20]
    run(1, common(root, ckpt, tmp_path / "plain", **mica))
    got, expected = losses(tmp_path / "reader"), losses(tmp_path / "plain")
    assert len(got) == 3 and max(abs(a - b) / abs(b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_a_windowed_family_trains_the_same_at_tp2_pp2(tmp_path, family):
    """Families whose attention has a window (8 tokens, far shorter than the 256-token
    packed sequences): Gemma 3 (local and global layers, its own rope per kind, sandwich
    norms) and Mistral train through the trainer, and TP2 x PP2 gives TP=1's losses."""
    root = tmp_path / "inputs"
    root.mkdir()
    ckpt = make_inputs(root, family=family)
    run(1, common(root, ckpt, tmp_path / "tp1", **{"train.iters": 3, "parallel.tp": 1, "data.pack": "true"}))
    run(4, common(root, ckpt, tmp_path / "tp2pp2", **{"train.iters": 3, "parallel.tp": 2, "parallel.pp": 2,
                                                       "data.pack": "true"}))
    got, expected = losses(tmp_path / "tp2pp2"), losses(tmp_path / "tp1")
    assert len(got) == 3 and max(abs(a - b) / abs(b) for a, b in zip(got, expected)) <= 1e-5, (got, expected)


def test_resume_on_another_layout_continues_exactly(setup, tmp_path):
    """Started at TP2 x PP2, resumed at TP=1 x DP=2, then at one process: the losses of an
    uninterrupted TP2 x PP2 run (fp32, dropout off), from the factors and AdamW moments saved
    unsharded under HF names."""
    root, ckpt = setup
    extra = {"train.iters": 6, "output.save_every": 2, "output.keep_last": 3, "train.global_batch": 4}
    run(4, common(root, ckpt, tmp_path / "straight", **{"parallel.tp": 2, "parallel.pp": 2, **extra}))
    expected = last_losses(tmp_path / "straight")
    out = tmp_path / "moved"
    shutil.copytree(tmp_path / "straight", out)  # the same run, so far
    for step in (4, 6):  # as if the job had ended after step 2
        shutil.rmtree(out / "checkpoints" / f"step_{step:07d}")
    run(2, common(root, ckpt, out, **{"parallel.tp": 1, "parallel.pp": 1, **extra}))  # DP=2
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    run(1, common(root, ckpt, out, **{"parallel.tp": 1, "parallel.pp": 1, **extra}))
    resumed = [r for r in records(out) if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [2, 4]
    assert "TP=2 x PP=2 x DP=1 (4 processes) -> TP=1 x PP=1 x DP=2 (2 processes)" in resumed[0]["notes"][0]
    got = last_losses(out)
    assert sorted(got) == list(range(1, 7))
    assert max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected) <= 1e-5, (got, expected)
