"""tools/analyze and milora_megatron.analysis: synthetic matrices with known answers, then a
tiny HF Llama with a hand-built MiLoRA-form PEFT adapter (and its merged folder) end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from milora_megatron.analysis import spectrum as S
from milora_megatron.analysis.forgetting import (SECTION, exact_match, final_number, general_text_metrics, load_pair,
                                                 normalise_text, task_accuracy, task_loss)

# peft's merge_and_unload calls a transformers API that warns about its own rename
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

from paths import ROOT  # noqa: E402
TOOLS = os.path.join(ROOT, "tools", "analyze")
F64 = torch.float64


def _orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]


def _known_w(m=40, n=30, seed=0):
    """W = U diag(s) V^T with distinct known singular values 10 .. 0.5."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, v = _orthonormal(m, k, gen), _orthonormal(n, k, gen)
    s = torch.linspace(10.0, 0.5, k, dtype=F64)
    return u @ torch.diag(s) @ v.T, u, s, v


# ---- synthetic matrices ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["bottom", "top"])
def test_delta_inside_a_subspace_scores_one_there_and_zero_in_the_other(where):
    w, u, s, v = _known_w()
    r = 4
    cols = slice(-r, None) if where == "bottom" else slice(0, r)
    mix = torch.randn(r, r, generator=torch.Generator().manual_seed(3), dtype=F64)
    dw = u[:, cols] @ mix @ v[:, cols].T
    sim = S.similarity_to_w(S.svd64(w), S.svd64(dw), r)
    other = "top" if where == "bottom" else "bottom"
    for side in ("left", "right"):
        assert sim[f"{side}_{where}"] == pytest.approx(1.0, abs=1e-10)
        assert sim[f"{side}_{other}"] == pytest.approx(0.0, abs=1e-10)


def test_similarity_half_overlap_and_chance_level():
    w, u, s, v = _known_w()
    # dW's column space: 2 of W's bottom-4 left vectors + 2 middle ones -> left_bottom = 2/4
    dw = u[:, [-1, -2, 10, 11]] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)) @ v[:, [12, 13, 14, 15]].T
    sim = S.similarity_to_w(S.svd64(w), S.svd64(dw), 4)
    assert sim["left_bottom"] == pytest.approx(0.5, abs=1e-10)
    assert sim["left_top"] == pytest.approx(0.0, abs=1e-10)
    assert sim["right_bottom"] == pytest.approx(0.0, abs=1e-10)
    assert S.chance_similarity((40, 30), 4) == {"left": 0.1, "right": 4 / 30}
    # phi normalises by min(i, j): a 2-dim subspace inside a 4-dim one scores 1
    assert S.subspace_similarity(u[:, :2], u[:, :4]) == pytest.approx(1.0)


def test_amplification_hand_case():
    w = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64))
    w[0, 3] = 0.5
    dw = torch.zeros(4, 4, dtype=F64)
    dw[0, 3], dw[1, 2] = 2.0, 1.0  # top-1 singular pair of dW: (e1, e4), sigma 2
    amp = S.amplification(w, S.svd64(dw), 1)
    assert amp["utwv_fro"] == pytest.approx(0.5)  # e1^T W e4
    assert amp["dw_fro"] == pytest.approx(5 ** 0.5)
    assert amp["amplification"] == pytest.approx(5 ** 0.5 / 0.5)  # Hu et al.: ||dW||_F / ||U^T W V||_F
    assert amp["amplification_projected"] == pytest.approx(2.0 / 0.5)  # MiLoRA Table 7: ||U^T dW V|| / ||U^T W V||


def test_amplification_against_direct_float64_and_lowrank_svd():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 18, generator=gen, dtype=F64)
    b, a = torch.randn(24, 6, generator=gen, dtype=F64), torch.randn(6, 18, generator=gen, dtype=F64)
    dw = 0.7 * b @ a
    r = 3
    u, sv, vh = torch.linalg.svd(dw)
    direct = torch.linalg.norm(dw) / torch.linalg.norm(u[:, :r].T @ w @ vh[:r].T)
    dense, factored = S.amplification(w, S.svd64(dw), r), S.amplification(w, S.lowrank_svd64(b, a, 0.7), r)
    assert dense["amplification"] == pytest.approx(float(direct), rel=1e-10)
    assert factored["amplification"] == pytest.approx(float(direct), rel=1e-10)
    projected = sv[:r].norm() / torch.linalg.norm(u[:, :r].T @ w @ vh[:r].T)
    assert factored["amplification_projected"] == pytest.approx(float(projected), rel=1e-10)
    low = S.lowrank_svd64(b, a, 0.7)
    torch.testing.assert_close(low.s, sv[:6], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low.u @ torch.diag(low.s) @ low.v.T, dw, rtol=1e-12, atol=1e-12)


def test_singular_values_each_method_started_from():
    sigma = torch.arange(10, 0, -1, dtype=F64)
    assert S.init_singular_values(sigma, 3, "milora")["init"] == [3.0, 2.0, 1.0]
    assert S.init_singular_values(sigma, 3, "mica")["init"] == [3.0, 2.0, 1.0]  # minor components (MiCA abstract)
    assert S.init_singular_values(sigma, 3, "pissa")["init"] == [10.0, 9.0, 8.0]
    for method in ("lora", None):
        got = S.init_singular_values(sigma, 3, method)
        assert got["init"] is None and got["init_subspace"] is None
        assert got["top"] == [10.0, 9.0, 8.0] and got["bottom"] == [3.0, 2.0, 1.0]
        assert (got["max"], got["min"], got["count"]) == (10.0, 1.0, 10)
    with pytest.raises(ValueError):
        S.init_singular_values(sigma, 3, "dora")


def test_answers_and_exact_match():
    assert final_number("She has 3 apples... The answer is 1,204.") == "1204"
    assert final_number("so 7 * 6 = 42\n#### 42.0") == "42"
    assert final_number("12 plus 7 is 19") == "19"
    assert final_number("no digits") is None
    assert exact_match("The answer is 42", "x = 6 * 7. The answer is 42.", "final_number")
    assert not exact_match("The answer is 41", "The answer is 42.", "final_number")
    assert not exact_match("nothing", "nothing either", "final_number")
    assert exact_match("  The sum is 19. ", "the   sum is 19", "exact")
    assert not exact_match("The sum is 18.", "The sum is 19.")
    assert normalise_text("A  B.\n") == "a b"


# ---- a tiny HF Llama, a MiLoRA-form PEFT adapter, its merged folder --------------------------------------------
RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj", "down_proj")
PREFIX = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def _weight(name):
    layer, target = name
    return f"model.layers.{layer}.{PREFIX[target]}.{target}.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """base (HF, sharded), adapter (MiLoRA export form: [B, -B0][A; A0], r -> 2r, alpha -> 2 alpha,
    B0 A0 from W's bottom-r triplets), merged (PEFT merge_and_unload), dW per weight, text files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from milora_megatron.models.tiny_hf import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("analyze")
    base, adapter, merged = (str(root / n) for n in ("base", "adapter", "merged"))
    sentences = open(os.path.join(ROOT, "data", "demo", "general.txt")).read().split(". ")
    general = root / "general.txt"
    general.write_text("\n".join(s.strip() + "." for s in sentences[:120]) + "\n")
    model = make_hf_model(base, layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=512, seed=3)
    make_tokenizer(base, sentences + ["What is 12 plus 7? 12 plus 7 is 19. ### Instruction: ### Response:"] * 3,
                   vocab=512)

    s = ALPHA / RANK
    gen = torch.Generator().manual_seed(7)
    tensors, deltas = {}, {}
    params = dict(model.named_parameters())
    for layer in range(2):
        for target in TARGETS:
            name = (layer, target)
            w = params[_weight(name)].detach().to(F64)
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root_s = (sv[-RANK:] / s).sqrt()
            b0, a0 = u[:, -RANK:] * root_s, root_s[:, None] * vh[-RANK:]
            b = b0 + 0.3 * torch.randn(b0.shape, generator=gen, dtype=F64)
            a = a0 + 0.3 * torch.randn(a0.shape, generator=gen, dtype=F64)
            a_exp, b_exp = torch.cat([a, a0]).float(), torch.cat([b, -b0], dim=1).float()
            key = f"base_model.model.{_weight(name)[: -len('.weight')]}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a_exp, b_exp
            deltas[name] = s * b_exp.to(F64) @ a_exp.to(F64)  # (2 alpha / 2r) * [B, -B0][A; A0]
    os.makedirs(adapter)
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": 2 * RANK,
              "lora_alpha": 2 * ALPHA, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    _write_json(os.path.join(adapter, "adapter_config.json"), config)
    _write_json(os.path.join(adapter, "milora_export.json"),
                {"method": "milora", "trained_rank": RANK, "trained_alpha": ALPHA, "form": "rank-2r [B, -B0][A; A0]"})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    peft_model.merge_and_unload().save_pretrained(merged, max_shard_size="100KB")
    return {"root": root, "base": base, "adapter": adapter, "merged": merged, "deltas": deltas,
            "general": str(general), "weights": {n: params[_weight(n)].detach().to(F64) for n in deltas}}


def _direct(w, dw, r):
    """Every spectrum number straight from torch.linalg.svd, independent of the module."""
    u, _, vh = torch.linalg.svd(dw)
    uw, sw, vwh = torch.linalg.svd(w, full_matrices=False)
    du, dv = u[:, :r], vh[:r].T

    def phi(x, y):
        return float((x.T @ y).square().sum() / r)

    return {"amplification": float(torch.linalg.norm(dw) / torch.linalg.norm(du.T @ w @ dv)),
            "left_top": phi(du, uw[:, :r]), "left_bottom": phi(du, uw[:, -r:]),
            "right_top": phi(dv, vwh[:r].T), "right_bottom": phi(dv, vwh[-r:].T),
            "init": sw[-r:].tolist(), "max": float(sw[0]), "min": float(sw[-1])}


def _check_entries(report, tiny, rel):
    assert len(report["entries"]) == 2 * len(TARGETS)
    for e in report["entries"]:
        name = (e["layer"], e["target"])
        want = _direct(tiny["weights"][name], tiny["deltas"][name], RANK)
        assert e["amplification"] == pytest.approx(want["amplification"], rel=rel)
        for k in ("left_top", "left_bottom", "right_top", "right_bottom"):
            assert e["similarity"][k] == pytest.approx(want[k], abs=rel)
        assert e["w_sigma"]["init"] == pytest.approx(want["init"], rel=1e-9)
        assert (e["w_sigma"]["max"], e["w_sigma"]["min"]) == pytest.approx((want["max"], want["min"]), rel=1e-9)


def test_spectrum_cli_on_adapter_matches_direct_computation(tiny):
    out = tiny["root"] / "spectrum.json"
    plots = tiny["root"] / "plots"
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "spectrum.py"), "--base", tiny["base"], "--adapter",
                          tiny["adapter"], "--out-json", str(out), "--plot-dir", str(plots)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "q_proj" in run.stdout and "init sigma (bottom)" in run.stdout
    with open(out) as f:
        report = json.load(f)
    assert (report["method"], report["method_source"], report["rank"], report["init_subspace"]) == \
        ("milora", "milora_export.json", RANK, "bottom")
    # the hand-built adapter's milora_export.json records no base: said once, on stderr and in the JSON
    notes = [line for line in run.stderr.splitlines() if "note:" in line]
    assert notes == [f"spectrum: note: {report['base_check']['note']}"], run.stderr
    assert notes[0].startswith("spectrum: note: this adapter records no base checkpoint; the base cannot be "
                               f"checked: {tiny['adapter']}: its milora_export.json has no base_shards")
    assert report["base_check"]["verified"] is False
    _check_entries(report, tiny, rel=1e-8)
    for e in report["entries"]:
        # the exported initial update s B0 A0 has exactly W's bottom-r singular values (float32 factors)
        assert e["init_update_rel_err"]["bottom"] < 1e-5 < e["init_update_rel_err"]["top"]
    for png in ("similarity_heatmaps.png", "amplification.png", "w_spectrum.png"):
        assert (plots / png).stat().st_size > 1000


def test_merged_folder_gives_the_adapter_numbers(tiny):
    from milora_megatron.analysis.deltas import spectrum_report

    adapter = spectrum_report(tiny["base"], adapter_dir=tiny["adapter"], progress=False)
    merged = spectrum_report(tiny["base"], merged_dir=tiny["merged"], rank=RANK, method="milora", progress=False)
    assert len(merged["unchanged"]) == 2 * 4  # k, o, gate, up untouched in both layers
    _check_entries(merged, tiny, rel=1e-4)  # the merged weights are float32-rounded W + dW
    for a, m in zip(adapter["entries"], merged["entries"]):
        assert (a["layer"], a["target"]) == (m["layer"], m["target"])
        assert m["amplification"] == pytest.approx(a["amplification"], rel=1e-4)
        assert m["similarity"] == pytest.approx(a["similarity"], abs=1e-4)
    with pytest.raises(ValueError, match="rank"):
        spectrum_report(tiny["base"], merged_dir=tiny["merged"])


@pytest.fixture(scope="module")
def adapter_pair(tiny):
    return load_pair(tiny["base"], adapter_dir=tiny["adapter"])


def _direct_ce(p_model, q_model, windows):
    """-mean sum_v p(v) log q(v) over all positions, straight from the two models."""
    with torch.no_grad():
        lp = torch.log_softmax(p_model(input_ids=windows[:, :-1]).logits.float(), -1)
        lq = torch.log_softmax(q_model(input_ids=windows[:, :-1]).logits.float(), -1)
    return float(-(lp.exp() * lq).sum(-1).mean())


def test_forgetting_of_base_against_itself_is_its_entropy(tiny):
    from transformers import AutoModelForCausalLM

    from milora_megatron.data import text_samples

    pair = load_pair(tiny["base"])
    got = general_text_metrics(pair, tiny["general"], seq_len=16, batch_size=3, max_windows=5, progress=False)
    windows, _ = text_samples(tiny["general"], pair.tokenizer, 16, 5)
    base = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    entropy = _direct_ce(base, base, windows)
    assert got["windows"] == 5 and got["tokens"] == 5 * 16
    assert got["forgetting_loss"] == pytest.approx(entropy, rel=1e-5)
    assert got["forgetting_loss"] - got["base_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert got["forgetting_kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["base_ppl"] == pytest.approx(got["finetuned_ppl"])


def test_forgetting_of_an_adapter_rises_and_matches_merged(tiny, adapter_pair):
    from transformers import AutoModelForCausalLM

    from milora_megatron.data import text_samples

    got = general_text_metrics(adapter_pair, tiny["general"], seq_len=16, batch_size=3, max_windows=5, progress=False)
    windows, _ = text_samples(tiny["general"], adapter_pair.tokenizer, 16, 5)
    base = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(tiny["merged"]).eval()
    assert got["forgetting_loss"] == pytest.approx(_direct_ce(base, merged, windows), rel=1e-4)
    assert got["base_entropy"] == pytest.approx(_direct_ce(base, base, windows), rel=1e-5)
    assert got["forgetting_kl"] > 1e-3
    assert got["forgetting_kl"] == pytest.approx(got["forgetting_loss"] - got["base_entropy"], rel=1e-4)
    merged_pair = load_pair(tiny["base"], finetuned_dir=tiny["merged"])
    via_merged = general_text_metrics(merged_pair, tiny["general"], seq_len=16, batch_size=5, max_windows=5,
                                      progress=False)
    assert via_merged["forgetting_loss"] == pytest.approx(got["forgetting_loss"], rel=1e-4)
    assert via_merged["finetuned_ppl"] == pytest.approx(got["finetuned_ppl"], rel=1e-4)


def test_task_loss_and_exact_match_on_a_hand_case(tiny, adapter_pair):
    """References = the fine-tuned model's own greedy output (unbatched, unpadded) for record 1
    and a wrong one for record 2: the batched, left-padded evaluation must score 1 of 2."""
    from milora_megatron.data import TEMPLATES, tokenize_examples

    tok = adapter_pair.tokenizer
    records = [{"instruction": "What is 12 plus 7?", "output": "placeholder"},  # the shorter prompt: left-padded
               {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "placeholder"}]
    prompt = TEMPLATES["alpaca"].format(records[0])[0]
    ids = tok(prompt, return_tensors="pt")
    with adapter_pair.use("finetuned") as m, torch.no_grad():
        out = m.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    records[0]["output"] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split(SECTION)[0]
    records[1]["output"] = "certainly not this"
    task = tiny["root"] / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in records))

    acc = task_accuracy(adapter_pair, "finetuned", str(task), "alpaca", max_new_tokens=6, batch_size=2, progress=False)
    assert (acc["correct"], acc["examples"], acc["exact_match"]) == (1, 2, 0.5)

    loss = task_loss(adapter_pair, "finetuned", str(task), "alpaca", batch_size=2, progress=False)
    total, count = 0.0, 0
    for e_ids, e_mask in tokenize_examples(str(task), "alpaca", tok):  # unbatched, unpadded
        x = torch.from_numpy(e_ids)[None]
        with adapter_pair.use("finetuned") as m, torch.no_grad():
            logp = torch.log_softmax(m(input_ids=x).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, x[0, 1:, None])[:, 0]
        total += float((nll * torch.from_numpy(e_mask[1:])).sum())
        count += int(e_mask[1:].sum())
    assert loss["task_tokens"] == count
    assert loss["task_loss"] == pytest.approx(total / count, rel=1e-5)
    base_loss = task_loss(adapter_pair, "base", str(task), "alpaca", batch_size=2, progress=False)
    assert base_loss["task_loss"] != pytest.approx(loss["task_loss"], rel=1e-3)  # the adapter is on


def test_forgetting_cli_writes_json(tiny):
    out = tiny["root"] / "forgetting.json"
    task = tiny["root"] / "task_cli.jsonl"
    task.write_text(json.dumps({"instruction": "What is 2 plus 2?", "output": "The answer is 4."}) + "\n")
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "forgetting.py"), "--base", tiny["base"], "--adapter",
                          tiny["adapter"], "--general-text", tiny["general"], "--seq-len", "16", "--max-windows", "2",
                          "--task-file", str(task), "--answer-extractor", "final_number", "--max-new-tokens", "4",
                          "--task-on-base", "--out-json", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "forgetting loss" in run.stdout and "exact match" in run.stdout
    with open(out) as f:
        result = json.load(f)
    note = result["base_check"]["note"]
    assert note.startswith("this adapter records no base checkpoint; the base cannot be checked")
    assert [line for line in run.stderr.splitlines() if "note:" in line] == [f"forgetting: note: {note}"]
    g = result["general"]
    assert g["windows"] == 2 and g["forgetting_loss"] > g["base_entropy"] > 0
    assert set(result["task"]) >= {"finetuned", "base"} and result["task"]["finetuned"]["examples"] == 1


@pytest.mark.parametrize("tool", ["spectrum.py", "forgetting.py"])
def test_cli_help(tool):
    run = subprocess.run([sys.executable, os.path.join(TOOLS, tool), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--base" in run.stdout and "--out-json" in run.stdout


def test_forgetting_errors_name_the_folder(tmp_path):
    from milora_megatron.analysis.forgetting import load_pair

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no weights"):  # before: "Repo id must be in the form ..."
        load_pair(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair(str(tmp_path / "nowhere"))


# ---- provenance: a base that can be checked, and one that cannot ---------------------------------------------
def _shards(folder):
    from milora_megatron.checkpoint.atomic import sha256_file

    return {f: {"sha256": sha256_file(os.path.join(folder, f)), "bytes": os.path.getsize(os.path.join(folder, f))}
            for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


def test_spectrum_says_whether_the_base_was_checked(tiny, tmp_path):
    """An export recording its base's shards is checked (verified, or refused when another
    model is given); one that records none (a PEFT adapter from elsewhere, a merged folder
    without milora_export.json) is analysed with a one-line note saying the base was not
    checked."""
    import shutil

    from milora_megatron.analysis.deltas import spectrum_report
    from milora_megatron.errors import CheckpointError

    few = dict(layers=[0], targets=["q_proj"], progress=False)
    recorded = str(tmp_path / "recorded")
    shutil.copytree(tiny["adapter"], recorded)
    info = json.load(open(os.path.join(recorded, "milora_export.json")))
    _write_json(os.path.join(recorded, "milora_export.json"), {**info, "base_shards": _shards(tiny["base"])})
    report = spectrum_report(tiny["base"], adapter_dir=recorded, **few)
    assert report["base_check"] == {"verified": True, "note": None}

    other = str(tmp_path / "other_base")
    shutil.copytree(tiny["base"], other)
    _transpose_first_shard_tensor(other)  # same files, other bytes
    with pytest.raises(CheckpointError, match=r"is not the model .* was trained from: model-00001-of-\d+.safetensors differs"):
        spectrum_report(other, adapter_dir=recorded, **few)

    plain = str(tmp_path / "plain_peft")  # what PEFT itself saves: no milora_export.json at all
    shutil.copytree(tiny["adapter"], plain)
    os.remove(os.path.join(plain, "milora_export.json"))
    note = spectrum_report(other, adapter_dir=plain, rank=RANK, **few)["base_check"]["note"]
    assert note.startswith(f"this adapter records no base checkpoint; the base cannot be checked: {plain}: it has no "
                           "milora_export.json (not exported by milora-megatron), so --base")
    assert note.endswith(f"its adapter_config.json names {tiny['base']!r}") and "\n" not in note
    merged = spectrum_report(tiny["base"], merged_dir=tiny["merged"], rank=RANK, **few)["base_check"]["note"]
    assert merged.startswith("this merged folder records no base checkpoint; the base cannot be checked")


def _transpose_first_shard_tensor(folder):
    from safetensors.torch import load_file, save_file

    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = -tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})


# ---- the forgetting tool: both models must read the same tokens ----------------------------------------------
def _merged_with_tokenizer(tiny, folder, make):
    """A copy of the merged model whose folder carries the tokenizer ``make(folder)`` saves."""
    import shutil

    shutil.copytree(tiny["merged"], folder)
    make(folder)
    return folder


def _base_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["base"])


def _retrained(tiny):
    from milora_megatron.models.tiny_hf import make_tokenizer

    sentences = open(os.path.join(ROOT, "data", "demo", "general.txt")).read().split(". ")
    return lambda folder: make_tokenizer(folder, sentences[::-1][:40], vocab=512)


def _other_eos(tiny):
    def make(folder):
        tok = _base_tokenizer(tiny)
        tok.eos_token = "<pad>"
        tok.save_pretrained(folder)

    return make


@pytest.mark.parametrize("make,difference", [
    (_retrained, r"vocabulary: \d+ vs \d+ tokens, id \d+ is '.*' vs '.*'"),
    (_other_eos, "special tokens: eos_token '</s>' vs '<pad>'"),
])
def test_forgetting_refuses_a_merged_model_with_another_tokenizer(tiny, tmp_path, capsys, make, difference):
    """Token ids that mean different things to the two models make the KL meaningless: one
    line naming both folders and what differs, before any model is loaded."""
    import re

    from milora_megatron.cli.forgetting import main

    other = _merged_with_tokenizer(tiny, str(tmp_path / "merged_other_tok"), make(tiny))
    code = main(["--base", tiny["base"], "--merged", other, "--general-text", tiny["general"], "--seq-len", "16",
                 "--max-windows", "1", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(rf"forgetting: error: the tokenizers of --base {re.escape(tiny['base'])} and --merged "
                     rf"{re.escape(other)} differ \({difference}\): ", lines[0]), lines[0]


def test_forgetting_accepts_the_same_tokenizer_saved_again(tiny, tmp_path):
    """The base's tokenizer, loaded and saved once more into the merged folder (other file
    contents, the same tokenizer): accepted, and the numbers are the plain merged folder's."""
    def save_again(folder):
        _base_tokenizer(tiny).save_pretrained(folder)
        path = os.path.join(folder, "tokenizer.json")
        definition = json.load(open(path))
        with open(path, "w") as f:  # other bytes (a file hash would differ), the same definition
            json.dump(definition, f, indent=3, sort_keys=True)

    same = _merged_with_tokenizer(tiny, str(tmp_path / "merged_same_tok"), save_again)
    assert open(os.path.join(same, "tokenizer.json")).read() != open(os.path.join(tiny["base"], "tokenizer.json")).read()
    got = general_text_metrics(load_pair(tiny["base"], finetuned_dir=same), tiny["general"], seq_len=16,
                               max_windows=2, progress=False)
    want = general_text_metrics(load_pair(tiny["base"], finetuned_dir=tiny["merged"]), tiny["general"], seq_len=16,
                                max_windows=2, progress=False)
    assert got == want and got["forgetting_kl"] > 0


# ---- command-line errors: one line for the user's, a traceback for a bug -------------------------------------
def test_spectrum_and_plot_run_errors_are_one_line(tiny, tmp_path, capsys):
    from milora_megatron.cli import plot_run, spectrum

    cases = [
        (spectrum.main, ["--base", tiny["base"], "--adapter", tiny["adapter"], "--layers", "x", "--quiet"],
         "spectrum: error: layer range 'x' is not a layer or a range such as 8-11"),
        (spectrum.main, ["--base", os.path.join(tiny["base"], "config.json"), "--adapter", tiny["adapter"], "--quiet"],
         "is a file, not an HF model folder (give the folder that holds config.json)"),
        (spectrum.main, ["--base", tiny["base"], "--adapter", str(tmp_path / "nowhere"), "--quiet"],
         f"spectrum: error: adapter folder {tmp_path / 'nowhere'} does not exist"),
        (plot_run.main, [str(tmp_path / "no_run")], f"plot_run: error: run folder {tmp_path / 'no_run'} does not exist"),
    ]
    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    (bad_run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    cases.append((plot_run.main, [str(bad_run), "--out", str(tmp_path / "p.png")],
                  f"plot_run: error: {bad_run / 'metrics.jsonl'} line 2 is not JSON"))
    (tmp_path / "a_file").write_text("x")
    cases.append((spectrum.main, ["--base", tiny["base"], "--adapter", tiny["adapter"], "--layers", "0", "--targets",
                                  "q_proj", "--out-json", str(tmp_path / "a_file" / "r.json"), "--quiet"],
                  f"spectrum: error: cannot write {tmp_path / 'a_file' / 'r.json'}: {tmp_path / 'a_file'} is a file, "
                  "not a folder"))
    for main, argv, message in cases:
        code = main(argv)
        err = [line for line in capsys.readouterr().err.splitlines() if "note:" not in line]
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_a_bug_in_an_analysis_keeps_its_traceback(tiny, monkeypatch, capsys):
    from milora_megatron.analysis import deltas
    from milora_megatron.cli import spectrum

    def buggy(*args, **kwargs):
        raise KeyError("entries")

    monkeypatch.setattr(deltas, "spectrum_report", buggy)
    with pytest.raises(KeyError):
        spectrum.main(["--base", tiny["base"], "--adapter", tiny["adapter"], "--quiet"])
    assert "error:" not in capsys.readouterr().err
