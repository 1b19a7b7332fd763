"""tools/gpu_check.py at toy sizes on the CPU: every section of the GPU check runs and passes
here too, so the one script prepared for a rarely lent GPU does not rot between loans."""

import json
import os
import subprocess
import sys

from paths import ROOT  # noqa: E402


def test_gpu_check_runs_at_tiny_size(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert run.returncode == 0, (run.stdout[-3000:], {k: v.get("error") for k, v in sections.items()})
    assert list(sections) == ["trainer", "logits", "branch", "sdpa", "init", "throughput"]
    assert all(s["ok"] for s in sections.values())
    trainer = sections["trainer"]
    assert trainer["backend"] == "gloo" and trainer["factor_dtypes"] == ["torch.float32"]
    assert trainer["random_init_skipped"]  # the base is loaded: megatron's init is not run
    assert trainer["resumed_at"] == 4 and trainer["resume_max_rel_diff"] == 0.0  # bit-exact on CPU
    assert sections["logits"]["float32"]["max_abs_diff"] <= 1e-4
    assert sections["branch"]["milora"]["bit_identical"]
    assert [leg["method"] for leg in sections["throughput"]["legs"]] == ["lora", "milora", "lora", "hf+peft lora"]
    assert sections["throughput"]["legs"][2]["recompute"] == "full"
    assert "gpu check on CPU" in (tmp_path / "gpu_check.log").read_text()
