"""Console progress lines and ``metrics.jsonl``; GPU telemetry through nvidia-ml-py when present."""

from __future__ import annotations

import functools
import json
import os
import time

from ..errors import is_disk_full


def nvml_uuid(torch_uuid) -> str:
    """NVML's name for a device from torch's ``get_device_properties(...).uuid``.

    NVML numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``, so torch's device
    index is the wrong GPU whenever the visible set is remapped (Slurm, containers); the
    UUID is the same on both sides. torch prints it bare, NVML wants "GPU-..." (or "MIG-...")."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


@functools.lru_cache(maxsize=1)
def _nvml_handle():
    """This rank's GPU for nvidia-ml-py, or None (no GPU, no NVML): looked up once per process."""
    try:
        import pynvml
        import torch

        if not torch.cuda.is_available():
            return None
        pynvml.nvmlInit()
        uuid = nvml_uuid(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:
        return None


def _gpu_stats() -> dict:
    """Peak memory from torch (this process's allocations); utilisation and power from NVML."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    stats = {"gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    handle = _nvml_handle()
    if handle is not None:
        try:
            import pynvml

            stats["gpu_util"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            stats["gpu_power_w"] = round(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1)
        except Exception:  # telemetry must never stop training
            pass
    return stats


class MetricsLog:
    """Written by one rank only (the caller decides which): metrics.jsonl, the console, and
    the ``sinks`` (TensorBoard, W&B: train/sinks.py) given the same records."""

    def __init__(self, out_dir: str, total_steps: int, enabled: bool, sinks=()):
        self.enabled, self.total = enabled, total_steps
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.start = time.time()
        self.first_step = None
        self.sinks = list(sinks) if enabled else []
        self.disk_full: str | None = None  # the file a full disk could not take

    def log(self, record: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        if "step" in record and "loss" in record:
            record.update(_gpu_stats())
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # every rank must stop together: the trainer asks ``disk_full`` at its next step boundary
            self.disk_full = self.path
        for sink in self.sinks:
            try:
                sink.log(record)
            except Exception as exc:  # a logging backend must never stop training
                print(f"warning: {type(sink).__name__} failed ({exc}); it is switched off", flush=True)
                self.sinks.remove(sink)
        if console:
            print(self._line(record), flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def _line(self, r: dict) -> str:
        if "loss" not in r:
            return " | ".join(f"{k} {v}" for k, v in r.items() if k != "time")
        step = r["step"]
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.time() - r.get("step_time_s", 0.0)
        done = step - self.first_step
        rate = (time.time() - self.start) / max(done, 1)
        eta = rate * (self.total - step)
        parts = [f"step {step}/{self.total}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
                 f"tokens/s {r['tokens_per_s']:.0f}", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
        if "gpu_mem_gib" in r:
            parts.append(f"mem {r['gpu_mem_gib']} GiB")
        return " | ".join(parts)
