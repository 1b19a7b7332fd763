"""milora_megatron/train/parallel.py: every process group gets the configured timeout, and a
GPU run waits on the host over gloo (an NCCL barrier would abort at its timeout while one
rank tokenises)."""

from datetime import timedelta

import pytest
import torch

import milora_megatron.train.parallel as parallel


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_group_gets_the_configured_timeout(monkeypatch, device):
    import megatron.core.parallel_state as ps
    import torch.distributed as dist

    calls = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("init", (backend, kw)))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.setdefault("host", kw) and "host-group")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(parallel.compat, "apply", lambda d: None)
    monkeypatch.setattr(parallel.compat, "model_parallel_manual_seed", lambda s: None)
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: calls.setdefault("megatron", kw))
    monkeypatch.setattr(parallel.ParallelGroups, "from_megatron", classmethod(lambda cls, host=None: host))
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "0" if name == "RANK" else "2")
    host = parallel.init_distributed(torch.device(device), tp=2, pp=1, seed=1, timeout_minutes=45)
    backend, kwargs = calls["init"]
    assert backend == ("nccl" if device == "cuda" else "gloo") and kwargs["timeout"] == timedelta(minutes=45)
    assert calls["megatron"]["distributed_timeout_minutes"] == 45
    if device == "cuda":  # host-side waits on gloo, with the same timeout
        assert calls["host"] == {"backend": "gloo", "timeout": timedelta(minutes=45)} and host == "host-group"
    else:  # the default group is gloo already
        assert "host" not in calls and host is None


def test_the_timeout_is_a_validated_config_key():
    from milora_megatron.train.config import ConfigError, load_config

    assert load_config(None, []).parallel.timeout_minutes == 30  # megatron's default
    assert load_config(None, ["parallel.timeout_minutes=90"]).parallel.timeout_minutes == 90
    with pytest.raises(ConfigError, match="parallel.timeout_minutes must be >= 1"):
        load_config(None, ["parallel.timeout_minutes=0"])
