"""After a few adapter steps at TP=2: the merged HF export, the PEFT adapter applied to the
ORIGINAL base, and the megatron model give the same logits, for every method."""

import json
import os

import pytest
import torch
from damage import flip
from distributed import run_distributed
from hf_tiny import FAMILIES, MOE_FAMILIES, make_hf_model

CASES = [("lora", "branch"), ("pissa", "branch"), ("milora", "branch"), ("mica", "branch"), ("milora", "merge")]
TOL = 1e-4


def _train_worker(ckpt, run_root, tokens, cases=CASES):
    from megatron.core import parallel_state as ps

    from milora_megatron.adapters import AdapterConfig
    from milora_megatron.adapters.apply import apply_adapters
    from milora_megatron.checkpoint.adapters import save_adapter_checkpoint, step_dir
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.models.decoder import build_gpt, gather_logits, transformer_config

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    base = BaseCheckpoint(ckpt)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    out = {}
    for method, residual in cases:
        # megatron's MoE layer trains at TP > 1 under sequence parallelism only
        model = build_gpt(base.shape, transformer_config(base.shape, tp=tp, sp=bool(base.shape.experts)))
        base.load_into(model, rank, tp)
        cfg = AdapterConfig(method=method, rank=4, alpha=8, dropout=0.05, residual=residual,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        targets = apply_adapters(model, cfg, ps.get_tensor_model_parallel_group())
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-2)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            model(tokens, pos, None, labels=labels).mean().backward()
            opt.step()
        run = os.path.join(run_root, f"{method}_{residual}")
        save_adapter_checkpoint(step_dir(run, 3), targets, cfg, base, step=3)
        model.eval()
        with torch.no_grad():
            out[(method, residual)] = gather_logits(model, model(tokens, pos, None))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from milora_megatron.convert.importer import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("export")
    make_hf_model(str(root / "hf"), tied=False, seed=5)
    ckpt = convert_hf_to_megatron(str(root / "hf"), str(root / "ckpt"), tp=2, progress=False)
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = run_distributed(_train_worker, 2, tp=2, ckpt=ckpt, run_root=str(root / "runs"), tokens=tokens)[0]
    return root, tokens, logits


@pytest.mark.parametrize("method,residual", CASES)
def test_merged_equals_peft_equals_megatron(trained, method, residual):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from milora_megatron.convert.exporter import export_merged, export_peft

    root, tokens, logits = trained
    run = str(root / "runs" / f"{method}_{residual}")
    merged_dir = export_merged(run, str(root / f"merged_{method}_{residual}"), progress=False)
    peft_dir = export_peft(run, str(root / f"peft_{method}_{residual}"))
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        peft_cfg = json.load(f)
    two_r = method in ("pissa", "milora")
    assert peft_cfg["r"] == (8 if two_r else 4) and peft_cfg["lora_alpha"] == (16 if two_r else 8)

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(tokens).logits
        original = AutoModelForCausalLM.from_pretrained(str(root / "hf"))
        base_logits = original(tokens).logits
        peft = PeftModel.from_pretrained(original, peft_dir).eval()(tokens).logits
    megatron = logits[(method, residual)]
    # the adapter really moved the model, so the comparison below is not vacuous
    assert (merged - base_logits).abs().max() > 50 * TOL
    assert (merged - megatron).abs().max() <= TOL
    assert (peft - merged).abs().max() <= TOL


@pytest.fixture(scope="module")
def families_trained(tmp_path_factory):
    """Three MiLoRA steps at TP=2 on a tiny model of each non-Llama family (the MoE ones:
    attention, Qwen3-MoE's dense first layer and every expert adapted, experts split over
    expert-TP 2)."""
    from milora_megatron.convert.importer import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("families")
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    logits = {}
    for family in FAMILIES[1:]:
        make_hf_model(str(root / family / "hf"), seed=8, family=family)
        ckpt = convert_hf_to_megatron(str(root / family / "hf"), str(root / family / "ckpt"), tp=2, progress=False)
        logits[family] = run_distributed(_train_worker, 2, tp=2, ckpt=ckpt, run_root=str(root / family / "runs"),
                                         tokens=tokens, cases=[("milora", "branch")])[0][("milora", "branch")]
    return root, tokens, logits


def _merged(root, family: str) -> str:
    """The family's merged export (written once, for the tests that read it)."""
    from milora_megatron.convert.exporter import export_merged

    out = root / family / "merged"
    if not out.exists():
        export_merged(str(root / family / "runs" / "milora_branch"), str(out), progress=False)
    return str(out)


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_families_export_equals_peft_merge(families_trained, family):
    """Merged export == PEFT's own merge of the exported adapter onto the original model
    (weights), and PEFT, the merged model and megatron give the same logits. PEFT takes
    every tensor of the adapter file (for an MoE model: the experts' through the fused 3-D
    parameters of transformers' model)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from milora_megatron.convert.exporter import export_peft

    root, tokens, logits = families_trained
    run = str(root / family / "runs" / "milora_branch")
    merged_dir = _merged(root, family)
    peft_dir = export_peft(run, str(root / family / "peft"))
    original = AutoModelForCausalLM.from_pretrained(str(root / family / "hf"))
    peft = PeftModel.from_pretrained(original, peft_dir).eval()
    with safe_open(os.path.join(peft_dir, "adapter_model.safetensors"), framework="pt") as f:
        written = set(f.keys())
    loaded = {n.replace(".default", "") for n, _ in peft.named_parameters() if ".lora_" in n}
    assert loaded == written, sorted(loaded ^ written)[:6]
    if family in MOE_FAMILIES:
        assert any(".mlp.experts.base_layer.lora_A" in n for n in written)  # gate_up_proj inside down_proj
    else:
        adapted = {n.split(".lora_A.")[0] for n in written if ".lora_A." in n}
        assert len(adapted) == 4 * 7 and all(n.split(".")[-1] in (
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") for n in adapted)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        peft_logits = peft(tokens).logits
        base_logits = AutoModelForCausalLM.from_pretrained(str(root / family / "hf"))(tokens).logits
        merged_logits = merged(tokens).logits
    assert (merged_logits - base_logits).abs().max() > 50 * TOL
    assert (merged_logits - logits[family]).abs().max() <= TOL and (peft_logits - merged_logits).abs().max() <= TOL
    reference = peft.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert set(reference) == set(ours)
    for name, tensor in reference.items():
        assert (ours[name] - tensor).abs().max() <= 1e-5, name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_per_expert_adapter_holds_each_experts_update(families_trained, family):
    """--expert-form per-expert: every expert's gate/up/down (Mixtral's w1/w3/w2) under its
    on-disk name, one rank and alpha for every module, and s B' A' of each module is exactly
    what the merged export added to that weight."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.convert.exporter import export_peft

    root, _, _ = families_trained
    run = str(root / family / "runs" / "milora_branch")
    shape = BaseCheckpoint(str(root / family / "ckpt")).shape
    peft_dir = export_peft(run, str(root / family / "peft_per_expert"), expert_form="per-expert")
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["r"] == 8
    names = shape.expert_names  # Mixtral's w1/w3/w2 under block_sparse_moe, Qwen3-MoE's own names under mlp
    assert set(names.projections.values()) <= set(config["target_modules"])
    tensors = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert f"base_model.model.model.layers.1.{names.expert_module(3, 'gate_proj')}.lora_A.weight" in tensors
    original, merged = {}, {}
    _merged(root, family)
    for folder, into in ((root / family / "hf", original), (root / family / "merged", merged)):
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as f:
                    into.update({k: f.get_tensor(k) for k in f.keys()})
    scaling = config["lora_alpha"] / config["r"]
    modules = [k[len("base_model.model."): -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    for module in modules:
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        delta = merged[f"{module}.weight"].double() - original[f"{module}.weight"].double()
        assert (scaling * b @ a - delta).abs().max() <= 1e-5, module
    if not shape.has_dense_mlp:  # Mixtral: PEFT's own v4 -> v5 conversion loads this form exactly
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / family / "hf")), peft_dir)
        reference = peft.merge_and_unload().state_dict()
        ours = AutoModelForCausalLM.from_pretrained(str(root / family / "merged")).state_dict()
        assert max((reference[k] - ours[k]).abs().max() for k in reference) <= 1e-5


def _tiny_gemma3_multimodal(path: str):
    """A tiny Gemma3ForConditionalGeneration (the 4B/12B/27B architecture) around the tiny
    Gemma 3 text model, weights scaled as make_hf_model scales them, saved as transformers
    saves it (the Hub's layout: ``language_model.model.*``, ``vision_tower.*``)."""
    import math

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from milora_megatron.models.tiny_hf import family_config

    torch.manual_seed(9)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=family_config("gemma3").to_dict(),
                                                        vision_config=vision.to_dict(), mm_tokens_per_image=4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    model.save_pretrained(path)
    return model.eval()


def test_gemma3_multimodal_is_read_as_its_text_model(tmp_path, capfd):
    """Gemma3ForConditionalGeneration: its language model converts (a one-line notice names
    what is left out), trains at TP=2, and exports as a text-only Gemma3ForCausalLM whose
    logits are megatron's; the PEFT adapter loads onto the ORIGINAL multimodal model (its
    module names) and gives the same logits on text."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    from milora_megatron.convert.exporter import export_merged, export_peft
    from milora_megatron.convert.importer import convert_hf_to_megatron

    original = _tiny_gemma3_multimodal(str(tmp_path / "hf"))
    ckpt = convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, progress=False)
    notice = [line for line in capfd.readouterr().err.splitlines() if "Gemma3ForConditionalGeneration" in line]
    assert len(notice) == 1 and "as Gemma3ForCausalLM" in notice[0] and "left out" in notice[0], notice
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    ours = run_distributed(_train_worker, 2, tp=2, ckpt=ckpt, run_root=str(tmp_path / "runs"), tokens=tokens,
                           cases=[("milora", "branch")])[0][("milora", "branch")]
    run = str(tmp_path / "runs" / "milora_branch")
    merged = AutoModelForCausalLM.from_pretrained(export_merged(run, str(tmp_path / "merged"), progress=False))
    assert type(merged).__name__ == "Gemma3ForCausalLM"
    peft = PeftModel.from_pretrained(original, export_peft(run, str(tmp_path / "peft"))).eval()
    assert sum(".lora_A." in n for n, _ in peft.named_parameters()) == 4 * 7
    with torch.no_grad():
        merged_logits, peft_logits = merged(tokens).logits, peft(input_ids=tokens).logits
        base_logits = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))(input_ids=tokens).logits
    assert (merged_logits - base_logits).abs().max() > 50 * TOL
    assert (merged_logits - ours).abs().max() <= TOL and (peft_logits - merged_logits).abs().max() <= TOL


def test_export_errors(trained, tmp_path):
    import shutil

    from milora_megatron.checkpoint.adapters import LATEST
    from milora_megatron.convert.exporter import export_merged, export_peft
    from milora_megatron.convert.importer import convert_hf_to_megatron

    root, _, _ = trained
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        export_merged(str(tmp_path / "empty_run"), str(tmp_path / "o1"), progress=False)
    (tmp_path / "empty_run" / "checkpoints" / "step_0000005.partial").mkdir()
    with pytest.raises(FileNotFoundError, match="only interrupted ones"):
        export_merged(str(tmp_path / "empty_run"), str(tmp_path / "o1"), progress=False)
    (tmp_path / "empty_run" / "checkpoints" / LATEST).write_text("step_0000005\n")  # a pointer is only a hint
    with pytest.raises(FileNotFoundError, match="only interrupted ones"):
        export_merged(str(tmp_path / "empty_run"), str(tmp_path / "o1"), progress=False)
    with pytest.raises(ValueError, match="interrupted checkpoint"):
        export_merged(str(tmp_path / "empty_run" / "checkpoints" / "step_0000005.partial"), str(tmp_path / "o1"),
                      progress=False)
    with pytest.raises(ValueError, match="drop --adapter-only"):
        export_peft(str(root / "ckpt"), str(tmp_path / "o2"))

    # a run whose base was replaced (re-converted) or removed
    moved_base = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    run = shutil.copytree(root / "runs" / "lora_branch", tmp_path / "run")
    meta_path = run / "checkpoints" / "step_0000003" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["base"]["path"] = str(moved_base)
    meta_path.write_text(json.dumps(meta))
    export_merged(str(run), str(tmp_path / "ok"), progress=False)
    # a bit-identical reconversion (another time, another place) is the same base
    convert_hf_to_megatron(str(root / "hf"), str(moved_base), overwrite=True, progress=False)
    export_merged(str(run), str(tmp_path / "ok2"), progress=False)
    convert_hf_to_megatron(str(root / "hf"), str(moved_base), dtype="fp16", overwrite=True, progress=False)
    with pytest.raises(ValueError, match="changed since training"):
        export_merged(str(run), str(tmp_path / "o3"), progress=False)
    shutil.rmtree(moved_base)
    with pytest.raises(FileNotFoundError, match="is missing .*give its new place with --base"):
        export_peft(str(run), str(tmp_path / "o4"))
    export_peft(str(run), str(tmp_path / "o5"), base_path=str(root / "ckpt"))  # the base, somewhere else


def test_analysis_refuses_a_base_that_is_not_the_exports(trained, tmp_path):
    """A same-shaped other model given as --base: the analysis tools say so instead of
    analysing the wrong base (our exports record the base's source shards)."""
    from milora_megatron.analysis.deltas import spectrum_report
    from milora_megatron.analysis.forgetting import evaluate
    from milora_megatron.convert.exporter import export_merged, export_peft

    root, _, _ = trained
    run = root / "runs" / "milora_branch"
    adapter = export_peft(str(run), str(tmp_path / "peft"))
    merged = export_merged(str(run), str(tmp_path / "merged"), progress=False)
    make_hf_model(str(tmp_path / "other"), tied=False, seed=6)  # same shapes, other weights
    report = spectrum_report(str(root / "hf"), adapter_dir=adapter, layers=[0], targets=["q_proj"], progress=False)
    assert report["method"] == "milora"  # the right base passes
    for kwargs in ({"adapter_dir": adapter}, {"merged_dir": merged}):
        with pytest.raises(ValueError, match="is not the model .* was trained from"):
            spectrum_report(str(tmp_path / "other"), progress=False, **kwargs)
    with pytest.raises(ValueError, match="is not the model .* was trained from"):
        evaluate(str(tmp_path / "other"), adapter_dir=adapter, progress=False)


def _cli(argv, capsys):
    """megatron_to_hf in this process: (exit status, stderr lines)."""
    from milora_megatron.cli.megatron_to_hf import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


def test_no_verify_skips_only_the_bases_checksums(trained, tmp_path, capsys):
    """A flipped byte in an adapter checkpoint is refused with --no-verify too (before: it was
    exported, as entries of 1e37)."""
    import shutil

    from milora_megatron.convert.exporter import export_merged, export_peft
    from milora_megatron.errors import CheckpointError

    root, _, _ = trained
    run = shutil.copytree(root / "runs" / "milora_branch", tmp_path / "run")
    damaged = run / "checkpoints" / "step_0000003" / "adapter-stage000.safetensors"
    size = os.path.getsize(damaged)
    flip(damaged, count=256)
    assert os.path.getsize(damaged) == size
    for export in (lambda out: export_merged(str(run), out, verify=False, progress=False),
                   lambda out: export_peft(str(run), out, verify=False)):
        with pytest.raises(CheckpointError, match=f"{damaged} does not match its checksum"):
            export(str(tmp_path / "out"))
    code, err = _cli(["--ckpt", str(run), "--out", str(tmp_path / "out"), "--no-verify", "--quiet"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("megatron_to_hf: error: ") and str(damaged) in err[0] and "checksum" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # the base's own checksums are what --no-verify skips: a flipped base layer goes through it
    base = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    flip(base / "layer-00001.safetensors", count=16)
    with pytest.raises(CheckpointError, match="layer-00001.safetensors does not match its checksum"):
        export_merged(str(base), str(tmp_path / "out"), progress=False)
    export_merged(str(base), str(tmp_path / "out"), verify=False, progress=False)


def test_a_base_folder_that_holds_a_run_is_refused(trained, tmp_path, capsys):
    """Before: the untouched base was exported without a word. Now: one line, and the two
    explicit ways (the step folder, the base's manifest) export what they name."""
    import shutil

    from milora_megatron.checkpoint.base import MANIFEST
    from milora_megatron.convert.exporter import export_merged, export_peft
    from milora_megatron.errors import CheckpointError

    root, _, _ = trained
    both = shutil.copytree(root / "ckpt", tmp_path / "both")
    shutil.copytree(root / "runs" / "lora_branch" / "checkpoints", both / "checkpoints")
    step = both / "checkpoints" / "step_0000003"
    for export in (lambda out: export_merged(str(both), out, progress=False), lambda out: export_peft(str(both), out)):
        with pytest.raises(CheckpointError) as refused:
            export(str(tmp_path / "out"))
        text = str(refused.value)
        assert text.startswith(f"{both} is a base checkpoint and also holds a training run (checkpoints/ (step_0000003))")
        assert f"give the step folder (e.g. {step})" in text and str(both / MANIFEST) in text
    code, err = _cli(["--ckpt", str(both), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and str(both) in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists()

    adapter = export_merged(str(step), str(tmp_path / "adapter"), progress=False)
    with open(os.path.join(adapter, "milora_export.json")) as f:
        assert json.load(f)["adapter_checkpoint"] == str(step)
    alone = export_merged(str(both / MANIFEST), str(tmp_path / "base"), progress=False)
    with open(os.path.join(alone, "milora_export.json")) as f:
        info = json.load(f)
    assert info["base_checkpoint"] == str(both) and "adapter_checkpoint" not in info
    with open(os.path.join(alone, "model.safetensors"), "rb") as f, \
         open(os.path.join(export_merged(str(root / "ckpt"), str(tmp_path / "plain"), progress=False),
                           "model.safetensors"), "rb") as g:
        assert f.read() == g.read()  # the plain base exports as before, and the same

    # the other marks of a run written into the folder; a model's own config.json is none
    shutil.rmtree(both / "checkpoints")
    (both / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    export_merged(str(both), str(tmp_path / "hf_config_is_no_run"), progress=False)
    (both / "config.json").write_text(json.dumps({"model": {}, "peft": {"method": "lora"}, "train": {"iters": 3}}))
    with pytest.raises(CheckpointError, match=r"holds a training run \(config.json\).*checkpoints/step_N"):
        export_merged(str(both), str(tmp_path / "out"), progress=False)
    (both / "config.json").unlink()
    (both / "run.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds a training run \(run.json\)"):
        export_merged(str(both), str(tmp_path / "out"), progress=False)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> (an empty folder, whether it is a tmpfs of ``size`` bytes): False where
    none can be mounted (not root, no mount); unmounted afterwards."""
    import shutil
    import subprocess

    mounted = []

    def mount(size):
        folder = tmp_path / "disk"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return folder, False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return folder, False
        mounted.append(folder)
        return folder, True

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


_ENOSPC_CLI = """
import errno, sys
import milora_megatron.convert.exporter as exporter
from milora_megatron.cli.megatron_to_hf import main

def save_file(tensors, path, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device", path)

exporter.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_is_one_line_and_keeps_the_earlier_export(trained, tmp_path, small_disk):
    """An export that runs out of space: exit 2, one line naming --out and "no space left on
    device", no traceback, and the export it was to replace (--overwrite) untouched."""
    import hashlib
    import subprocess
    import sys

    from paths import ROOT

    from milora_megatron.convert.exporter import export_merged

    root, _, _ = trained
    run = str(root / "runs" / "lora_branch")
    measured = export_merged(run, str(tmp_path / "measure"), progress=False)
    pages = sum(-(-os.path.getsize(os.path.join(measured, n)) // 4096) for n in os.listdir(measured))
    disk, real = small_disk(pages * 4096 * 3 // 2)  # room for one export, not for a second beside it
    out = disk / "out"
    export_merged(run, str(out), progress=False)

    def contents():
        return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(os.listdir(out))}

    before = contents()
    cmd = ["--ckpt", run, "--out", str(out), "--overwrite", "--quiet"]
    if real:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "convert", "megatron_to_hf.py"), *cmd]
    else:  # no tmpfs here: the writer fails as a full disk makes it fail
        cmd = [sys.executable, "-c", _ENOSPC_CLI, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr[-3000:]
    assert err[0].startswith(f"megatron_to_hf: error: {out}: no space left on device"), err
    assert "Traceback" not in done.stderr
    assert contents() == before  # the earlier export survives
    assert sorted(os.listdir(out.parent)) == ["out"]  # no .partial or .replaced left behind
