"""The trainer on a mixture-of-experts model (a tiny Qwen3-MoE: a dense first layer, then
sparse ones of 4 experts, top-2), MiLoRA on attention, the dense MLP and every expert:
expert parallelism (EP=2), and experts split over TP=2 ranks with sequence parallelism,
and PP=2 x EP=2, give a one-process run's losses and adapter; the init cache serves the
experts at another layout; a run resumes across EP sizes with the same losses and no
eigensolve; a bad EP is one line before the model is built."""

import json
import shutil

import pytest
import torch
from trainer_runs import TORCHRUN_WRAPPER, common, last_losses, losses, make_inputs, records, run

from milora_megatron.checkpoint.adapters import AdapterCheckpoint

TARGETS = "[q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj]"
REL = 1e-4


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """One process (EP=1), then EP=2 over two processes; four steps, checkpoints at 2 and 4.
    The first fills an init cache that the second reads."""
    root = tmp_path_factory.mktemp("moe")
    ckpt = make_inputs(root, family="qwen3_moe")
    extra = {"train.iters": 4, "output.save_every": 2, "output.keep_last": 3, "peft.targets": TARGETS}
    cache = {"peft.init_cache": str(root / "init_cache")}
    run(1, common(root, ckpt, root / "ep1", **{"parallel.tp": 1, **extra, **cache}))
    run(2, common(root, ckpt, root / "ep2", **{"parallel.tp": 1, "parallel.ep": 2, **extra, **cache}))
    return root, ckpt, extra


def _init(out) -> dict:
    """The latest run's init record (a resumed folder holds its first run's too)."""
    return [r for r in records(out) if r.get("event") == "init"][-1]


def _rel(got: dict, expected: dict) -> float:
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4], (got, expected)
    return max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)


def _same_adapter(a: str, b: str) -> None:
    mine, theirs = AdapterCheckpoint(a).tensors(), AdapterCheckpoint(b).tensors()
    assert set(mine) == set(theirs)
    experts = [k for k in mine if ".mlp.experts." in k]
    assert len(experts) == 3 * 3 * 4 * 4  # 3 sparse layers x 3 projections x 4 experts x (A, B, A0, B0)
    for key, tensor in mine.items():
        assert (tensor - theirs[key]).abs().max() <= 1e-3 * max(theirs[key].abs().max(), 1e-6), key


def test_expert_parallel_training_equals_one_process(moe_runs, tmp_path):
    """EP=2 (each rank two experts of every sparse layer, the expert adapters' gradients
    summed over their own replicas only), TP=2 x EP=2 with SP (each expert's linears and
    adapters split over two expert-TP ranks), PP=2 x EP=2, and TP=2 with SP and expert-TP 1:
    the losses (and adapter) of EP=1."""
    root, ckpt, extra = moe_runs
    expected = last_losses(root / "ep1")
    assert expected[4] < expected[1]
    assert _rel(last_losses(root / "ep2"), expected) <= REL
    # every expert's singular triplets from the cache the one-process run filled: no eigensolve
    assert _init(root / "ep2")["eigensolves_per_rank"] == [0, 0] and _init(root / "ep2")["factors_from"] == "cache"
    assert sum(_init(root / "ep1")["cache_misses_per_rank"]) == 4 * 3 + 3 + 3 * 3 * 4  # q/k/v, the dense MLP, experts
    _same_adapter(str(root / "ep2"), str(root / "ep1"))
    files = AdapterCheckpoint(str(root / "ep2")).meta["files"]
    assert files == ["adapter-stage000.safetensors", "adapter-stage000-experts000.safetensors",
                     "adapter-stage000-experts001.safetensors"]  # each EP rank writes its own experts
    run(4, common(root, ckpt, tmp_path / "tp2ep2", **{"parallel.tp": 2, "parallel.sp": "true", "parallel.ep": 2,
                                                       **extra}))
    assert _rel(last_losses(tmp_path / "tp2ep2"), expected) <= REL
    _same_adapter(str(tmp_path / "tp2ep2"), str(root / "ep1"))
    with open(tmp_path / "tp2ep2" / "run.json") as f:
        recorded = json.load(f)
    assert {k: recorded[k] for k in ("tp", "ep", "etp")} == {"tp": 2, "ep": 2, "etp": 2}
    run(4, common(root, ckpt, tmp_path / "pp2ep2", **{"parallel.tp": 1, "parallel.pp": 2, "parallel.ep": 2, **extra}))
    assert _rel(last_losses(tmp_path / "pp2ep2"), expected) <= REL
    # experts whole on both TP ranks (expert-TP 1): the two are expert-data-parallel replicas
    # that routed different sequence chunks, their expert gradients summed over that group
    run(2, common(root, ckpt, tmp_path / "tp2etp1", **{"parallel.tp": 2, "parallel.sp": "true", "parallel.etp": 1,
                                                        **extra}))
    assert _rel(last_losses(tmp_path / "tp2etp1"), expected) <= REL


@pytest.mark.parametrize("saved_ep,resumed_ep", [(2, 1), (1, 2)])
def test_resume_across_expert_parallel_sizes(moe_runs, tmp_path, saved_ep, resumed_ep):
    """A run saved at one EP size resumes at another (factors and AdamW moments under HF
    names, each expert's from its EP rank's own file) with the uninterrupted run's losses."""
    root, ckpt, extra = moe_runs
    out = tmp_path / "moved"
    shutil.copytree(root / f"ep{saved_ep}", out)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # as if the job had ended after step 2
    text = run(resumed_ep, common(root, ckpt, out, **{"parallel.tp": 1, "parallel.ep": resumed_ep, **extra}))
    assert "resuming on another layout" in text
    assert set(_init(out)["eigensolves_per_rank"]) == {0} and _init(out)["factors_from"] == "checkpoint"
    assert _rel(last_losses(out), last_losses(root / "ep1")) <= REL
    assert losses(out)[:2] == losses(root / f"ep{saved_ep}")[:2]


def test_a_bad_expert_parallel_size_is_one_line(moe_runs, tmp_path):
    """EP=3 fits three processes but not the 4 experts: one line from one rank, before any
    eigensolve (through the wrapper, which adds no launcher traceback of its own)."""
    root, ckpt, extra = moe_runs
    overrides = common(root, ckpt, tmp_path / "ep3", **{"parallel.tp": 1, "parallel.ep": 3, **extra,
                                                        "train.global_batch": 6})
    text = run(3, overrides, ok=False, launcher=TORCHRUN_WRAPPER)
    assert run.returncode != 0
    ours = [line for line in text.splitlines() if line.startswith("pretrain_milora: error:")]
    assert len(ours) == 1 and "EP size 3 does not divide the 4 experts" in ours[0], text[-2000:]
    assert "Traceback" not in text and "subspaces" not in text
    assert not (tmp_path / "ep3" / "checkpoints").exists()


def test_the_ep2_runs_exports_equal_peft_merge(moe_runs, tmp_path):
    """The EP=2 run's adapter (every EP rank's own experts' file): the merged export equals
    PEFT's merge of its fused adapter onto the original transformers model, weights and
    logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from milora_megatron.convert.exporter import export_merged, export_peft

    root, _, _ = moe_runs
    merged_dir = export_merged(str(root / "ep2"), str(tmp_path / "merged"), progress=False)
    peft_dir = export_peft(str(root / "ep2"), str(tmp_path / "peft"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "hf")), peft_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokens = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (peft(tokens).logits - merged(tokens).logits).abs().max() <= 1e-4
        reference = peft.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert set(reference) == set(ours)
    original = AutoModelForCausalLM.from_pretrained(str(root / "hf")).state_dict()
    assert any((ours[k] - original[k]).abs().max() > 0 for k in ours if ".mlp.experts." in k)  # experts trained
    for name, tensor in reference.items():
        assert (ours[name] - tensor).abs().max() <= 1e-5, name
