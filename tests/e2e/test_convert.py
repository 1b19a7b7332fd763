"""HF -> megatron -> HF converters: bit-identical round trip, every bad input's error, and
no half-written checkpoint after an interrupted conversion or on a full disk."""

import contextlib
import errno
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hf_tiny import FAMILIES, MOE_FAMILIES, make_hf_model
from safetensors.torch import load_file

from milora_megatron.checkpoint.base import BaseCheckpoint
from milora_megatron.convert.exporter import export_merged
from milora_megatron.convert.importer import convert_hf_to_megatron
from milora_megatron.errors import CheckpointError, ConfigError, DiskFullError, MissingPathError, OutputError

from paths import ROOT  # noqa: E402


def _all_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    dirs = {}
    models = [("untied_bf16", "llama", False, torch.bfloat16), ("tied_fp32", "llama", True, torch.float32)]
    models += [(family, family, None, torch.bfloat16) for family in FAMILIES if family != "llama"]
    for key, family, tied, dtype in models:
        make_hf_model(str(root / key), tied=tied, dtype=dtype, seed=3, family=family)
        with open(root / key / "tokenizer_config.json", "w") as f:  # a side file that must travel along
            json.dump({"model_max_length": 256}, f)
        dirs[key] = str(root / key)
    return root, dirs


@pytest.mark.parametrize("key,dtype", [("untied_bf16", None), ("tied_fp32", None), ("untied_bf16", "fp32"),
                                       *((family, None) for family in FAMILIES if family != "llama")])
def test_round_trip_is_bit_identical(hf_dirs, tmp_path, key, dtype):
    """Every family (the MoE ones' experts one tensor each, both ways, validated for EP=2)."""
    _, dirs = hf_dirs
    ep = 2 if key in MOE_FAMILIES else 1
    ckpt = convert_hf_to_megatron(dirs[key], str(tmp_path / "ckpt"), tp=2, pp=2, dtype=dtype, progress=False, ep=ep)
    if ep > 1:
        assert BaseCheckpoint(ckpt).manifest["parallel"] == {"tp": 2, "pp": 2, "ep": 2}
    out = export_merged(ckpt, str(tmp_path / "hf"), max_shard_bytes=60_000, progress=False)
    src, back = _all_tensors(dirs[key]), _all_tensors(out)
    assert set(src) == set(back)
    for name, tensor in src.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        with open(os.path.join(dirs[key], side)) as a, open(os.path.join(out, side)) as b:
            assert a.read() == b.read(), side


def test_export_loads_in_transformers(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    _, dirs = hf_dirs
    ckpt = convert_hf_to_megatron(dirs["tied_fp32"], str(tmp_path / "ckpt"), progress=False)
    out = export_merged(ckpt, str(tmp_path / "hf"), progress=False)
    ref = AutoModelForCausalLM.from_pretrained(dirs["tied_fp32"])
    got = AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        assert torch.equal(ref(tokens).logits, got(tokens).logits)


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_config(**changes):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(path, "w") as f:
            json.dump(cfg, f)

    return edit


def _first_shard(folder):
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("model-"))[0])


def _truncate(folder):
    path = _first_shard(folder)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def _transpose_down_proj(d):
    """The right element count, the wrong shape: a transposed down_proj in its shard."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"
    index = os.path.join(d, "model.safetensors.index.json")
    shard = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    tensors = load_file(os.path.join(d, shard))
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, os.path.join(d, shard), metadata={"format": "pt"})


def _drop_config_key(key):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        del cfg[key]
        with open(path, "w") as f:
            json.dump(cfg, f)

    return edit


@pytest.mark.parametrize("edit,tp,pp,kind,message", [
    (None, 3, 1, ConfigError, "does not divide the 4 attention heads"),
    (None, 4, 1, ConfigError, "does not divide the 2 KV heads"),
    (_set_config(intermediate_size=99), 2, 1, ConfigError, "does not divide the 99 FFN size"),
    (None, 1, 3, ConfigError, "PP size 3 does not divide the 4 layers"),
    (lambda d: os.remove(_first_shard(d)), 1, 1, MissingPathError, "missing shard model-00001"),
    (_truncate, 1, 1, CheckpointError, "truncated safetensors file"),
    (_set_config(model_type="gemma", architectures=["GemmaForCausalLM"]), 1, 1, CheckpointError,
     "unsupported architecture ['GemmaForCausalLM']"),
    (_set_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16), 1, 1, CheckpointError,
     "lacks 8 tensor(s) the config implies, e.g. ['model.layers.0.self_attn.q_norm.weight'"),
    (_set_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), 1, 1, CheckpointError,
     "unsupported rope type 'yarn'"),
    (_set_config(hidden_act="gelu"), 1, 1, CheckpointError, "hidden_act='gelu'"),
    (_transpose_down_proj, 1, 1, CheckpointError,
     "model.layers.0.mlp.down_proj.weight has shape [96, 64], the config implies [64, 96]"),
    (_drop_config_key("hidden_size"), 1, 1, CheckpointError, "llama config has no hidden_size"),  # was a KeyError
    (lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write("[]"), 1, 1, CheckpointError,
     'has no "weight_map"'),
])
def test_bad_input_errors(hf_dirs, tmp_path, edit, tp, pp, kind, message):
    """Each is the user's to fix, so a UserError of its kind (ValueError / FileNotFoundError
    too, for older callers), naming what is wrong."""
    _, dirs = hf_dirs
    src = dirs["untied_bf16"] if edit is None else _broken_copy(dirs["untied_bf16"], str(tmp_path / "bad"), edit)
    with pytest.raises(kind) as info:
        convert_hf_to_megatron(src, str(tmp_path / "ckpt"), tp=tp, pp=pp, progress=False)
    assert message in str(info.value)
    assert isinstance(info.value, (ValueError, FileNotFoundError))
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(str(tmp_path / "ckpt") + ".partial")


def test_existing_output_is_not_overwritten(hf_dirs, tmp_path):
    _, dirs = hf_dirs
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(OutputError, match="--overwrite") as info:
        convert_hf_to_megatron(dirs["untied_bf16"], str(tmp_path / "ckpt"), progress=False)
    assert isinstance(info.value, FileExistsError)


def test_hf_dir_that_is_a_file_is_named_as_one(hf_dirs, tmp_path):
    """A file given as --hf-dir (config.json, a shard, a .gguf): not "does not exist"."""
    _, dirs = hf_dirs
    config = os.path.join(dirs["untied_bf16"], "config.json")
    with pytest.raises(CheckpointError, match="is a file, not an HF model folder .give the folder that holds config"):
        convert_hf_to_megatron(config, str(tmp_path / "ckpt"), progress=False)
    with pytest.raises(MissingPathError, match="does not exist"):
        convert_hf_to_megatron(str(tmp_path / "nowhere"), str(tmp_path / "ckpt"), progress=False)
    assert not os.path.exists(tmp_path / "ckpt")


def test_interrupted_conversion_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.convert import importer

    _, dirs = hf_dirs
    calls = []
    real = importer.save_file

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(importer, "save_file", crash_on_third)
    out = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_megatron(dirs["untied_bf16"], out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    # A writer killed outright (SIGKILL) leaves only ``.partial``, which is never loadable
    # and is cleared by the next conversion.
    monkeypatch.setattr(importer, "save_file", real)
    os.makedirs(out + ".partial")
    with pytest.raises(ValueError, match="interrupted"):
        BaseCheckpoint(out + ".partial")
    with pytest.raises(FileNotFoundError, match="interrupted conversion is there"):
        BaseCheckpoint(out)
    convert_hf_to_megatron(dirs["untied_bf16"], out, progress=False)
    assert not os.path.exists(out + ".partial")
    BaseCheckpoint(out).check_files(checksums=True)


def test_damaged_base_checkpoint_is_refused(hf_dirs, tmp_path):
    from milora_megatron.checkpoint.base import BaseCheckpoint

    _, dirs = hf_dirs
    ckpt = convert_hf_to_megatron(dirs["untied_bf16"], str(tmp_path / "ckpt"), progress=False)
    layer = os.path.join(ckpt, "layer-00001.safetensors")
    data = bytearray(open(layer, "rb").read())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    open(layer, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        export_merged(ckpt, str(tmp_path / "hf"), progress=False)
    os.truncate(layer, len(data) - 10)
    with pytest.raises(ValueError, match="truncated or replaced"):
        BaseCheckpoint(ckpt)


def test_cli_help_and_exit_codes(hf_dirs, tmp_path):
    _, dirs = hf_dirs
    for tool in ("hf_to_megatron.py", "megatron_to_hf.py"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", tool), "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "--out" in out and "--dtype" in out
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", "hf_to_megatron.py"),
                          "--hf-dir", dirs["untied_bf16"], "--out", str(tmp_path / "x"), "--tp", "3", "--quiet"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not divide the 4 attention heads" in bad.stderr
    bad_ep = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", "hf_to_megatron.py"),
                             "--hf-dir", dirs["mixtral"], "--out", str(tmp_path / "x"), "--ep", "3", "--quiet"],
                            capture_output=True, text=True)
    assert bad_ep.returncode == 2 and "EP size 3 does not divide the 4 experts" in bad_ep.stderr
    assert not (tmp_path / "x").exists()
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", "hf_to_megatron.py"),
                         "--hf-dir", dirs["untied_bf16"], "--out", str(tmp_path / "ck"), "--tp", "2", "--pp", "2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "convert" in ok.stderr  # progress bar
    back = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert", "megatron_to_hf.py"),
                           "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"), "--quiet"],
                          capture_output=True, text=True)
    assert back.returncode == 0, back.stderr


def test_unreadable_config_and_unwritable_output_are_one_line(hf_dirs, tmp_path):
    """Errors that used to be tracebacks: a config.json that is not JSON, an output that
    cannot be written (refused before the source checksums)."""
    _, dirs = hf_dirs
    bad = _broken_copy(dirs["untied_bf16"], str(tmp_path / "bad"), lambda d: open(os.path.join(d, "config.json"), "w").write("{"))
    tool = os.path.join(ROOT, "tools", "convert", "hf_to_megatron.py")
    config = os.path.join(dirs["untied_bf16"], "config.json")
    for args, message in (([bad, str(tmp_path / "o")], "config.json is not valid JSON"),
                          ([dirs["untied_bf16"], str(tmp_path / "a_file" / "o")], "is a file, not a folder"),
                          ([config, str(tmp_path / "o")], f"{config} is a file, not an HF model folder")):
        (tmp_path / "a_file").write_text("x")
        out = subprocess.run([sys.executable, tool, "--hf-dir", args[0], "--out", args[1], "--quiet"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """The CLI catches only the user's errors: anything else is a bug and must not read like
    a bad input (no one-line "error:", the exception itself)."""
    from milora_megatron.cli import hf_to_megatron
    from milora_megatron.convert import importer

    for bug in (KeyError("num_layers"), ValueError("an internal invariant"), OSError("a bug's OSError")):
        def convert(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(importer, "convert_hf_to_megatron", convert)
        with pytest.raises(type(bug)):
            hf_to_megatron.main(["--hf-dir", "x", "--out", "y", "--quiet"])
        assert "error:" not in capsys.readouterr().err


# ---- a full disk ---------------------------------------------------------------------------------------------
def _used_bytes(folder, page=4096):
    """What a folder's files take on a tmpfs (whole pages)."""
    return sum(-(-os.path.getsize(os.path.join(d, f)) // page) * page for d, _, files in os.walk(folder) for f in files)


@contextlib.contextmanager
def _small_disk(path, size):
    """A real tmpfs of ``size`` bytes at ``path`` (root only; unmounted afterwards): True, or
    False where it cannot be mounted, and the caller fakes ENOSPC instead."""
    os.makedirs(path)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", path],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", path], check=True)


def _full_disk_save(tensors, path, metadata=None):
    """safetensors' writer failing as on a full disk, where no tmpfs can be mounted."""
    raise OSError(errno.ENOSPC, "No space left on device", path)


# the CLI with that writer
_FAKE_FULL_DISK = f"""import errno, sys
from milora_megatron.convert import importer
{inspect.getsource(_full_disk_save)}
importer.save_file = _full_disk_save
from milora_megatron.cli.hf_to_megatron import main
sys.exit(main(sys.argv[1:]))
"""


def _contents(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    """A disk with room for one checkpoint: the second conversion, with --overwrite over the
    first, fails as ONE line naming the output and "no space left on device", and the first
    checkpoint is intact; one into a new folder there leaves nothing behind."""
    from milora_megatron.checkpoint.base import BaseCheckpoint
    from milora_megatron.convert import importer

    src = str(tmp_path / "src")
    make_hf_model(src, dtype=torch.bfloat16, layers=2, vocab=128, seed=4)
    probe = convert_hf_to_megatron(src, str(tmp_path / "probe"), progress=False)
    need = _used_bytes(probe)
    disk = str(tmp_path / "disk")
    with _small_disk(disk, need * 3 // 2 + 16 * 4096) as mounted:
        out = os.path.join(disk, "ckpt")
        convert_hf_to_megatron(src, out, progress=False)  # fits
        before = _contents(out)
        cmd = ["-m", "milora_megatron.cli.hf_to_megatron"] if mounted else ["-c", _FAKE_FULL_DISK]
        run = subprocess.run([sys.executable, *cmd, "--hf-dir", src, "--out", out, "--overwrite", "--quiet"],
                             capture_output=True, text=True, timeout=120)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == DiskFullError.exit_code and run.returncode != 0
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert lines[0].startswith(f"hf_to_megatron: error: {out}: no space left on device"), lines
        assert run.stdout == ""
        # the existing checkpoint: untouched, complete, loadable; no .partial left behind
        assert _contents(out) == before
        BaseCheckpoint(out).check_files(checksums=True)
        assert not os.path.exists(out + ".partial")

        if not mounted:
            monkeypatch.setattr(importer, "save_file", _full_disk_save)
        second = os.path.join(disk, "second")
        with pytest.raises(DiskFullError, match="no space left on device") as info:
            convert_hf_to_megatron(src, second, progress=False)
        assert info.value.path == os.path.abspath(second)
        assert not os.path.exists(second) and not os.path.exists(second + ".partial")
        assert sorted(os.listdir(disk)) == ["ckpt"]
