"""tools/gpu_check.py at toy sizes on the CPU: every unit of the GPU check runs here too, so
the one script prepared for a rarely lent GPU does not rot between loans; a leg whose
process dies loses nothing of the others, and the budget skips what would not fit."""

import json
import os
import subprocess
import sys
import zipfile

from paths import ROOT  # noqa: E402

CHECK = os.path.join(ROOT, "tools", "gpu_check.py")


def _run(tmp_path, *extra):
    run = subprocess.run([sys.executable, CHECK, "--tiny", "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return run, json.loads((tmp_path / "gpu_check.json").read_text())


def test_gpu_check_runs_at_tiny_size_and_a_dead_leg_loses_nothing(tmp_path):
    """The milora leg's process dies (as a CUDA fault would end it): its error is recorded
    beside the other legs' figures, and every other unit still runs and passes."""
    run, report = _run(tmp_path, "--fail", "throughput.milora")
    sections = report["sections"]
    assert run.returncode == 1, run.stdout[-3000:]  # the dead leg makes the run not ok
    assert list(sections) == ["wheels", "throughput", "trainer", "logits", "branch", "sdpa", "moe", "init"]
    legs = sections["throughput"]["legs"]
    assert list(legs) == ["lora", "milora", "lora_full", "hf_peft"]
    assert "process died (exit code 3)" in legs["milora"]["error"] and "injected failure" in legs["milora"]["error"]
    for name in ("lora", "lora_full", "hf_peft"):
        assert legs[name]["ok"] and legs[name]["step_s"] > 0 and legs[name]["tokens_per_s"] > 0, (name, legs[name])
    assert legs["lora_full"]["recompute"] == "full" and legs["hf_peft"]["method"] == "hf+peft lora"
    assert "lora_tokens_per_s_over_hf_peft" in sections["throughput"] and "milora_step_over_lora" not in sections["throughput"]
    others = {k: v for k, v in sections.items() if k != "throughput"}
    assert all(s["ok"] for s in others.values()), {k: v.get("error") for k, v in others.items()}
    trainer = sections["trainer"]
    assert trainer["backend"] == "gloo" and trainer["factor_dtypes"] == ["torch.float32"]
    assert trainer["random_init_skipped"]  # the base is loaded: megatron's init is not run
    assert trainer["resumed_at"] == 4 and trainer["resume_max_rel_diff"] == 0.0  # bit-exact on CPU
    assert sections["logits"]["float32"]["max_abs_diff"] <= 1e-4
    assert sections["branch"]["milora"]["bit_identical"]
    sdpa = sections["sdpa"]
    assert sdpa["trainer_call"]["kernels"] and sdpa["trainer_call"]["rel_diff_vs_math"] <= 1e-5
    assert sections["init"]["svd_driver"].startswith("default")
    assert sections["init"]["precision"]  # the final result, not the partial one emitted before it
    moe = sections["moe"]
    assert moe["init"]["matrices"] == 8 * 3 and moe["init"]["sigma_rel_diff"] <= 1e-6
    assert len(moe["step"]) == 2 and moe["sparse_over_dense"] > 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "gpu check on CPU" in log and "throughput.milora: FAILED" in log


def test_the_budget_skips_what_would_not_fit_and_says_so(tmp_path):
    run, report = _run(tmp_path, "--budget-s", "1", "--sections", "throughput,init")
    assert run.returncode == 1
    legs = report["sections"]["throughput"]["legs"]
    assert all(leg["skipped"].startswith("not started: ") for leg in legs.values())
    assert "of --budget-s 1 left" in report["sections"]["init"]["skipped"]


def test_carried_wheels_are_checked_against_this_interpreter(tmp_path):
    """A wheel that downloads can still not work here: its Requires-Dist are checked."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from gpu_check import check_wheels

    def wheel(name, requires):
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        with zipfile.ZipFile(tmp_path / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA", meta)

    wheel("fine", ["torch>=1.0", "other-carried", 'nothing-here; extra == "dev"'])
    wheel("other_carried", [])
    wheel("needy", ["torch>=999", "not-a-package-anywhere"])
    result = check_wheels(str(tmp_path))
    assert not result["ok"]
    assert result["wheels"]["fine-1.0-py3-none-any.whl"]["unmet"] == []
    unmet = result["wheels"]["needy-1.0-py3-none-any.whl"]["unmet"]
    assert any(u.startswith("torch>=999 (installed ") for u in unmet)
    assert "not-a-package-anywhere (not installed)" in unmet
    assert check_wheels(str(tmp_path / "none"))["skipped"].startswith("no wheels")
