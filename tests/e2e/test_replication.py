"""The replication's parts (corpus, task, report) and a smoke run of replication/replicate.py
through every stage at toy sizes. The replication itself is `make replicate`, not a test."""

import json
import os
import random
import subprocess
import sys

from paths import ROOT  # noqa: E402
sys.path.insert(0, ROOT)

from replication import arithmetic, corpus, report  # noqa: E402


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


def test_replicate_smoke(tmp_path):
    """Every stage at toy sizes: corpus, pre-training, task, convert, torchrun training at TP=2,
    both exports, evaluation, spectrum, report."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "replication", "replicate.py"), "--work", str(tmp_path / "w"),
         "--report-dir", str(tmp_path / "report"), "--methods", "pissa,milora", "--seeds", "1", "--iters", "4",
         "--pretrain-steps", "6", "--test-examples", "8", "--heldout-windows", "2"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = open(tmp_path / "report" / "RESULTS.md").read()
    assert "| pissa |" in text and "| milora |" in text and "MiLoRA forgets less" in text
    runs = json.load(open(tmp_path / "report" / "runs.json"))["runs"]
    milora, pissa = runs["milora"][0], runs["pissa"][0]
    # the init subspaces show in the trained update: MiLoRA's dW lives in W's minor directions, PiSSA's in the principal
    assert milora["spectrum"]["all"]["left_bottom"] > 0.3 > milora["spectrum"]["all"]["left_top"]
    assert pissa["spectrum"]["all"]["left_top"] > 0.3 > pissa["spectrum"]["all"]["left_bottom"]
    # the trainer's in-run forgetting loss and the exported model's (transformers) measure the same thing
    assert milora["trainer_forgetting_loss"] > 0 and milora["eval"]["general"]["forgetting_loss"] > 0
    assert (tmp_path / "report" / "replication.png").exists()
