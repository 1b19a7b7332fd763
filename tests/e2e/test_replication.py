"""The replication's parts (corpus, task, report) and a smoke run of replication/replicate.py
through every stage at toy sizes. The replication itself is `make replicate`, not a test."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

from paths import ROOT  # noqa: E402
sys.path.insert(0, ROOT)

from replication import arithmetic, corpus, report, tradeoff  # noqa: E402


def test_arithmetic_answers_are_right_and_test_is_disjoint(tmp_path):
    from milora_megatron.analysis.forgetting import exact_match

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    arithmetic.write_splits(str(train), str(test), n_train=300, n_test=50)
    tr = [json.loads(line) for line in open(train)]
    te = [json.loads(line) for line in open(test)]
    assert len(tr) == 300 and len(te) == 50
    assert not {r["query"] for r in te} & {r["query"] for r in tr}
    for r in tr + te:
        a, op, b, _, c = r["response"].split(".")[0].split()
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(r["answer"]) >= 0
        assert exact_match(r["response"], r["answer"], "final_number")
        assert not exact_match(r["response"].replace(f"is {c}", f"is {int(c) + 1}"), r["answer"], "final_number")
    rng = random.Random(0)
    for _ in range(200):
        a, _op, b, *_ = arithmetic.problem(rng, 10)["response"].split()
        assert 1 <= int(a) <= 10 and 1 <= int(b) <= 10


def test_corpus_docstrings_and_file_split(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    long = "This explains at length why the thing exists and what it is for, in words a person wrote."
    for i in range(6):
        (src / f"m{i}.py").write_text(f'"""{long} module {i}"""\n\ndef f():\n    """short"""\n\n'
                                      f'class C:\n    """{long}\n    second   line {i}"""\n')
    (src / "broken.py").write_text("def (:\n")
    (src / "tests").mkdir()
    (src / "tests" / "t.py").write_text(f'"""{long}"""\n')
    docs = corpus.docstrings(str(src / "m0.py"))
    assert docs == [f"{long} module 0", f"{long} second line 0"]  # short one dropped, whitespace folded
    monkeypatch.setattr(corpus, "source_roots", lambda: [("fake", str(src))])
    info = corpus.build(str(tmp_path / "out"), held_out_every=3)
    train = open(tmp_path / "out" / "train.txt").read().splitlines()
    held = open(tmp_path / "out" / "heldout.txt").read().splitlines()
    assert info["files_with_docstrings"] == 6 and len(held) == 4 and len(train) == 8  # files 2 and 5 held out
    assert not set(held) & set(train)


def _result(acc, kl, bottom, top):
    return {"eval": {"general": {"forgetting_loss": 5 + kl, "forgetting_kl": kl, "finetuned_ppl": 100.0},
                     "task": {"finetuned": {"exact_match": acc, "task_loss": 1.0}}},
            "spectrum": {"all": {"amplification": 2.0, "left_bottom": bottom, "right_bottom": bottom,
                                 "left_top": top, "right_top": top}}}


def test_report_statistics_and_ordering(tmp_path):
    runs = {"lora": [_result(0.5, 0.10, 0.0, 0.1), _result(0.7, 0.14, 0.0, 0.1)],
            "milora": [_result(0.6, 0.02, 0.6, 0.0), _result(0.6, 0.04, 0.5, 0.0)]}
    stats = report.aggregate(runs)
    mean, std, values = stats["lora"]["accuracy"]
    assert (mean, values) == (60.0, [50.0, 70.0]) and abs(std - 14.1421356) < 1e-6
    assert abs(stats["milora"]["sim_bottom"][0] - 0.55) < 1e-12
    claims = report.ordering(stats)
    assert claims[0].startswith("MiLoRA forgets less (forgetting KL) than LoRA: yes") and "larger than" in claims[0]
    assert claims[1].startswith("MiLoRA is at least as accurate as LoRA: yes") and "not larger" in claims[1]
    table = report.markdown_table(stats, {"base_ppl": 99.0})
    assert "| milora | 60.0 ± 0.0 |" in table and "base 99.00" in table
    report.plot(stats, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _swept(method, scale, seed, acc, kl):
    return {**_result(acc, kl, 0.0, 0.0), "method": method, "lr_scale": scale, "lr": 1e-3 * scale, "seed": seed}


def test_tradeoff_front_matched_accuracy_and_claims(tmp_path):
    results = [_swept("milora", 0.5, s, a, k) for s, a, k in ((1, 0.20, 0.10), (2, 0.30, 0.20))]  # 25%, KL .15
    results += [_swept("milora", 1.0, s, a, k) for s, a, k in ((1, 0.40, 0.30), (2, 0.40, 0.30))]  # 40%, .30
    results += [_swept("lora", k, s, a, f) for k, a, f in ((0.5, 0.10, 0.05), (1.0, 0.30, 0.45)) for s in (1, 2)]
    results += [_swept("lora", 2.0, 1, 0.50, 0.85), _swept("lora", 4.0, 1, 0.45, 0.95)]  # one seed; x4 is beaten by x2
    results += [_swept("mica", 1.0, 1, 0.05, 0.01)]
    pts = tradeoff.points(results)
    assert [p.scale for p in pts["lora"]] == [0.5, 1.0, 2.0, 4.0]
    assert pts["milora"][0].acc == (25.0, pytest.approx(7.0710678)) and pts["milora"][0].kl[0] == pytest.approx(0.15)
    assert [p.scale for p in tradeoff.front(pts["lora"])] == [0.5, 1.0, 2.0]
    # LoRA at 25%: between x0.5 (10%, .05) and x1 (30%, .45): 3/4 of the way -> .35
    kl, spread, used = tradeoff.at_accuracy(pts["lora"], 25.0)
    assert kl == pytest.approx(0.35) and spread == 0.0 and [p.scale for p in used] == [0.5, 1.0]
    assert tradeoff.at_accuracy(pts["lora"], 40.0)[0] == pytest.approx(0.65)
    assert tradeoff.at_accuracy(pts["mica"], 25.0) is None and tradeoff.at_accuracy(pts["lora"], 60.0) is None
    assert tradeoff.relied_on(pts) == {("milora", 0.5), ("milora", 1.0), ("lora", 0.5), ("lora", 1.0), ("lora", 2.0)}
    claims = tradeoff.claims(pts)
    assert claims[0].startswith("At 25.0% accuracy (MiLoRA lr x0.5), MiLoRA forgets less than LoRA: yes (0.150 vs 0.350")
    assert "larger than the summed spread 0.071" in claims[0]
    # at 40% LoRA's front runs from x1 (2 seeds) to x2 (1 seed): its spread there is unknown, not 0
    assert math.isnan(tradeoff.at_accuracy(pts["lora"], 40.0)[1])
    at_40 = [c for c in claims if c.startswith("At 40.0% accuracy (MiLoRA lr x1), MiLoRA forgets less than LoRA")]
    assert at_40 == ["At 40.0% accuracy (MiLoRA lr x1), MiLoRA forgets less than LoRA: yes (0.300 vs 0.650; "
                     "difference 0.350; spread not measured: a point with one seed)"]
    assert any("MiCA's front does not reach it" in c for c in claims)
    assert any(c.startswith("MiLoRA's best accuracy is at least LoRA's: no (40.0% vs 50.0%") for c in claims)
    table = tradeoff.matched_table(pts)
    assert "0.350 ± 0.000 (interp.)" in table and "not reached (front 5.0-5.0%)" in table
    assert "| 40.0 ± 0.0% (lr x1, 2 seeds) | 0.300 ± 0.000 | 0.650 (interp.; spread not measured) |" in table
    assert "| LoRA | 50.0 (1 seed) | 0.002 (x2) | 0.850 (1 seed) | 1 |" in tradeoff.best_table(pts)
    tradeoff.plot(pts, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_sweep_plan_seeds_at_x1_and_elsewhere():
    from replication.replicate import sweep_plan

    assert sweep_plan(["lora", "milora"], [0.5, 1.0], [1, 2], [1]) == [
        (1, "lora", 0.5), (1, "milora", 0.5), (1, "lora", 1.0), (1, "milora", 1.0), (2, "lora", 1.0), (2, "milora", 1.0)]
    assert sweep_plan(["mica"], [1.0, 2.0], [1], [1]) == [(1, "mica", 1.0), (1, "mica", 2.0)]
    assert sweep_plan(["mica"], [0.5, 1.0], [1], [3]) == [(1, "mica", 1.0), (3, "mica", 0.5)]


def test_replicate_smoke(tmp_path):
    """Every stage at toy sizes: corpus, pre-training, task, convert, torchrun training at TP=2,
    both exports, evaluation, spectrum, the sweep's report (one method at two learning rates:
    two runs keep the suite's time; the comparison logic is tested above on known numbers)."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "replication", "replicate.py"), "--work", str(tmp_path / "w"),
         "--report-dir", str(tmp_path / "report"), "--methods", "milora", "--seeds", "1", "--iters", "4",
         "--lr-scales", "1,2", "--extra-seeds", "", "--pretrain-steps", "6", "--test-examples", "8",
         "--heldout-windows", "2"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = open(tmp_path / "report" / "RESULTS.md").read()
    assert "| milora |" in text and "Forgetting KL at matched accuracy" in text
    assert "| MiLoRA | " in text and "(x2)" in text and "MiLoRA's best accuracy" not in text  # no other method
    assert (tmp_path / "report" / "tradeoff.png").exists() and (tmp_path / "report" / "replication.png").exists()
    runs = json.load(open(tmp_path / "report" / "runs.json"))["runs"]
    assert sorted((r["method"], r["lr_scale"], r["lr"]) for r in runs) == [("milora", 1.0, 2e-3), ("milora", 2.0, 4e-3)]
    milora = runs[0]
    # the init subspace shows in the trained update: MiLoRA's dW lives in W's minor directions
    assert milora["spectrum"]["all"]["left_bottom"] > 0.3 > milora["spectrum"]["all"]["left_top"]
    # the trainer's in-run forgetting loss and the exported model's (transformers) measure the same thing
    assert milora["trainer_forgetting_loss"] > 0 and milora["eval"]["general"]["forgetting_loss"] > 0
    # a cached run is reused only for the settings it was trained with
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "replication", "replicate.py"), "--work", str(tmp_path / "w"),
         "--report-dir", str(tmp_path / "report2"), "--methods", "milora", "--seeds", "1", "--iters", "5",
         "--lr-scales", "1", "--extra-seeds", ""], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "was trained with" in again.stderr, again.stderr[-2000:]
