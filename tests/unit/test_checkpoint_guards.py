"""The checks that stand between a damaged or diverged checkpoint and its use: the divergence
guard covers every saved factor (A0/B0 too) with a scale that never comes from the tensor
under test, and a damaged file is a user error naming it."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from milora_megatron.checkpoint.adapters import FACTOR_LIMIT, META, AdapterCheckpoint, diverged, write_adapter_checkpoint
from milora_megatron.checkpoint.atomic import sha256_file
from milora_megatron.checkpoint.base import verify_recorded_files
from milora_megatron.errors import CheckpointError, MissingPathError

M = "model.layers.0.self_attn.q_proj"


def _svd_like(seed=0, out=48, inp=32, rank=4, sigma=100.0, scaling=1 / 64):
    """PiSSA/MiLoRA-shaped factors: B0 = U sqrt(S/s), A0 = sqrt(S/s) V^T of a weight whose top
    singular value is ``sigma``, and A, B a few small AdamW-sized steps away from them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s / s[0] * sigma
    root = (s[:rank] / scaling).sqrt()
    b0, a0 = (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()
    step = 1e-2 * torch.randn(rank, inp, generator=g).float()
    return {f"{M}.lora_A": a0 + step, f"{M}.lora_B": b0 - 1e-2, f"{M}.lora_A0": a0.clone(), f"{M}.lora_B0": b0.clone()}


def test_a_normal_checkpoint_passes():
    factors = _svd_like(sigma=3.0, scaling=2.0)
    assert diverged(factors) == []
    lora = {f"{M}.lora_A": torch.randn(4, 32) / 32 ** 0.5 + 1e-3, f"{M}.lora_B": torch.full((48, 4), 1e-3)}
    assert diverged(lora) == []
    assert diverged({f"{M}.lora_A": torch.zeros(4, 32), f"{M}.lora_B": torch.zeros(48, 0)}) == []  # MiCA's A at init


def test_a_large_but_sane_init_passes():
    """A top singular value of 100 and s = 1/64 (alpha 1, rank 64): A0/B0 entries near
    sqrt(6400) = 80, far beyond 1 but a real init; their trained factors may move with them."""
    factors = _svd_like(sigma=100.0, scaling=1 / 64)
    peak = float(factors[f"{M}.lora_A0"].abs().max())
    assert 10 < peak < FACTOR_LIMIT
    assert diverged(factors) == []
    factors[f"{M}.lora_A"] = factors[f"{M}.lora_A0"] * (0.5 * FACTOR_LIMIT)  # beyond FACTOR_LIMIT, within its scale
    assert float(factors[f"{M}.lora_A"].abs().max()) > FACTOR_LIMIT and diverged(factors) == []
    factors[f"{M}.lora_A"] = factors[f"{M}.lora_A0"] * (2 * FACTOR_LIMIT)
    assert diverged(factors) == [f"{M}.lora_A reached {2 * FACTOR_LIMIT * peak:.3g} (limit {FACTOR_LIMIT * peak:.3g})"]


@pytest.mark.parametrize("factor", ["lora_A0", "lora_B0"])
def test_an_exploded_initial_factor_is_caught(factor):
    factors = _svd_like()
    factors[f"{M}.{factor}"][1, 2] = 1e37
    assert diverged(factors) == [f"{M}.{factor} reached 1e+37 (limit {FACTOR_LIMIT:.3g})"]


def test_a_corrupt_initial_factor_does_not_widen_its_trained_factors_limit():
    """Before: A was held to FACTOR_LIMIT * max|A0|, so A0 = 1e37 let A reach 1e40 unseen."""
    factors = _svd_like(sigma=3.0, scaling=2.0)
    factors[f"{M}.lora_A0"][0, 0] = 1e37
    factors[f"{M}.lora_A"][0, 0] = 1e6
    bad = diverged(factors)
    assert len(bad) == 2 and bad[0].startswith(f"{M}.lora_A reached 1e+06") and bad[1].startswith(f"{M}.lora_A0 reached 1e+37")
    # each trained factor is scaled by its own initial factor only: a big B0 does not widen A
    factors = _svd_like(sigma=3.0, scaling=2.0)
    factors[f"{M}.lora_B0"] *= 1000  # still sane
    factors[f"{M}.lora_A"][0, 0] = 2 * FACTOR_LIMIT
    assert [b.split(" reached")[0] for b in diverged(factors)] == [f"{M}.lora_A"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_initial_or_trained_factor_is_caught(value):
    factors = _svd_like()
    factors[f"{M}.lora_B0"][3, 1] = value
    assert diverged(factors) == [f"{M}.lora_B0 is not finite"]
    factors = _svd_like()
    factors[f"{M}.lora_B"][0, 0] = value
    assert diverged(factors) == [f"{M}.lora_B is not finite"]


def test_without_initial_factors_the_limit_is_absolute():
    lora = {f"{M}.lora_A": torch.full((4, 32), 2 * FACTOR_LIMIT), f"{M}.lora_B": torch.zeros(48, 4)}
    assert [b.split(" reached")[0] for b in diverged(lora)] == [f"{M}.lora_A"]
    assert diverged({"other.weight": torch.full((2,), 1e37)}) == []  # not a factor


def _recorded(folder, tensors):
    name = "adapter-stage000.safetensors"
    save_file(tensors, os.path.join(folder, name))
    full = os.path.join(folder, name)
    return full, {name: {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}}


def test_damaged_files_are_checkpoint_errors_naming_the_file(tmp_path):
    full, records = _recorded(str(tmp_path), {"a": torch.arange(64.0)})
    verify_recorded_files(str(tmp_path), records, True, "adapter checkpoint")
    data = bytearray(open(full, "rb").read())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # same size
    open(full, "wb").write(bytes(data))
    verify_recorded_files(str(tmp_path), records, False, "adapter checkpoint")  # sizes only
    with pytest.raises(CheckpointError, match=f"{full} does not match its checksum"):
        verify_recorded_files(str(tmp_path), records, True, "adapter checkpoint")
    os.truncate(full, len(data) - 8)
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        verify_recorded_files(str(tmp_path), records, False, "adapter checkpoint")
    os.unlink(full)
    with pytest.raises(MissingPathError, match=f"{full} is missing"):
        verify_recorded_files(str(tmp_path), records, False, "adapter checkpoint")


class _Base:
    path = fingerprint = "base"


def test_an_adapter_json_that_lacks_keys_is_a_checkpoint_error(tmp_path):
    from milora_megatron.adapters import AdapterConfig

    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    write_adapter_checkpoint(str(ckpt), {f"{M}.lora_A": torch.zeros(2, 4), f"{M}.lora_B": torch.zeros(4, 2)},
                             AdapterConfig(method="lora", rank=2), _Base(), step=1)
    assert AdapterCheckpoint(str(tmp_path / "run"), verify=True).step == 1
    meta = json.loads((ckpt / META).read_text())
    del meta["files"]
    (ckpt / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks files"):
        AdapterCheckpoint(str(ckpt))
    (ckpt / META).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a milora-megatron-adapter"):
        AdapterCheckpoint(str(ckpt))
