"""The run folder a training run owns: one run at a time, and what a rerun resumes from.

* A lock (``run.lock``: pid, host, process start time, heartbeat) held by rank 0. A second
  run on the same folder is refused while the first lives; a lock whose process is gone
  (same host) or whose heartbeat is older than ``STALE_AFTER_S`` (another host) is taken
  over, saying so.
* Resume takes the newest complete, checksum-verified checkpoint (the ``latest`` pointer
  is only a hint) and says which newer ones it passed over. A folder whose checkpoints
  are all unusable is never restarted over without ``output.fresh_start=true``, which
  keeps the old run under ``previous-<time>/``.
* A resume must keep what the saved state depends on (the method and its factors' shapes,
  the data order, the parallel layout): a change is refused in one line, before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

from ..checkpoint.adapters import CHECKPOINTS, newest_complete
from ..checkpoint.atomic import write_json_atomic
from .state import optimizer_file, rank_file

LOCK = "run.lock"
STALE_AFTER_S = 900.0
CONFIG = "config.json"
RUN = "run.json"
RUN_FILES = (CONFIG, RUN, "metrics.jsonl", CHECKPOINTS)
# keys whose change a resume cannot honour: the factors' shapes and meaning, the samples and
# their order, the layout of the per-rank state
FIXED_ON_RESUME = ("peft.method", "peft.rank", "peft.alpha", "peft.targets", "peft.residual", "data.train",
                   "data.template", "data.pack", "train.seq_len", "train.seed")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, unusable checkpoints, incompatible resume)."""


class RunLockedError(RunFolderError):
    pass


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


class RunLock:
    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK)
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
                       "heartbeat": time.time()}

    def _holder_alive(self, holder: dict) -> bool:
        if holder.get("host") == self.record["host"]:
            start = _process_start(int(holder.get("pid", -1)))
            return start is not None and (holder.get("started") is None or abs(start - holder["started"]) < 1.0)
        return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over."""
        note = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                mine = holder.get("pid") == os.getpid() and holder.get("host") == self.record["host"]
                if holder and not mine and self._holder_alive(holder):
                    raise RunLockedError(
                        f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                        f"(heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago): one run per output.dir")
                if not mine:
                    note = f"took over a stale lock of pid {holder.get('pid')} on {holder.get('host')}"
                os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            return note

    def heartbeat(self) -> None:
        self.record["heartbeat"] = time.time()
        write_json_atomic(self.path, self.record)

    def release(self) -> None:
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") == self.record["pid"]:
                    os.unlink(self.path)
        except (OSError, ValueError):
            pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_conflicts(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every FIXED_ON_RESUME key a rerun changed."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in FIXED_ON_RESUME if a.get(k) != b.get(k)]


def _read(out: str, name: str) -> dict | None:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise RunFolderError(f"{path} is not valid JSON ({exc}); repair it or use output.fresh_start=true") from None


def plan(out: str, config: dict, world_size: int, fresh_start: bool) -> dict:
    """What this run does with ``out`` (rank 0 decides, before any expensive work):
    ``{"resume": path or None, "notes": [...]}``; raises RunFolderError when it must not go on."""
    checkpoints = os.path.join(out, CHECKPOINTS)
    has_checkpoints = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
    if fresh_start and (has_checkpoints or os.path.exists(os.path.join(out, CONFIG))):
        keep = os.path.join(out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(keep)
        for name in RUN_FILES:
            if os.path.exists(os.path.join(out, name)):
                shutil.move(os.path.join(out, name), keep)
        return {"resume": None, "notes": [f"output.fresh_start: the previous run was moved to {keep}"]}
    if not has_checkpoints:
        return {"resume": None, "notes": []}
    saved, run = _read(out, CONFIG), _read(out, RUN) or {}
    conflicts = resume_conflicts(saved, config) if saved is not None else []
    if conflicts:
        raise RunFolderError(f"{out} was trained with other settings that a resume cannot change "
                             f"({'; '.join(conflicts)}); use another output.dir, or output.fresh_start=true")
    parallel = config.get("parallel", {})
    now = (world_size, parallel.get("tp", 1), parallel.get("pp", 1))
    then = (run.get("world_size", world_size), run.get("tp", now[1]), run.get("pp", now[2]))
    relayout = now != then
    # the same layout resumes bit-exactly from every rank's own state (RNG included); another
    # layout from the layout-independent state (factors and AdamW moments under HF names)
    required = ([optimizer_file(s) for s in range(then[2])] if relayout
                else [rank_file(r) for r in range(world_size)])
    ckpt, skipped = newest_complete(out, verify=True, required=required)
    notes = ["passed over: " + "; ".join(skipped)] if skipped else []
    if ckpt is None:
        if relayout and newest_complete(out, verify=False, required=[rank_file(r) for r in range(then[0])])[0]:
            raise RunFolderError(
                f"{out} was trained on {_layout(then)}, this run is {_layout(now)}, and its checkpoints predate the "
                "layout-independent optimizer state: resume at the saved layout, or use another output.dir")
        raise RunFolderError(
            f"{out} holds checkpoints but none is complete and verified ({'; '.join(skipped)}); repair or move "
            "them, or rerun with output.fresh_start=true to start again (the old run is kept under previous-*/)")
    if not ckpt.verified:
        notes.append(f"{ckpt.path} predates checksums: loaded unverified")
    if relayout:
        notes.append(f"resuming on another layout: {_layout(then)} -> {_layout(now)} (factors and AdamW state "
                     "re-sharded; dropout streams are reseeded)")
    return {"resume": ckpt.path, "notes": notes, "relayout": relayout, "saved_stages": then[2]}


def _layout(layout: tuple[int, int, int]) -> str:
    world, tp, pp = layout
    return f"TP={tp} x PP={pp} x DP={world // max(tp * pp, 1)} ({world} processes)"


def prepare(cfg, world_size: int) -> tuple[dict, RunLock | None]:
    """Collective: rank 0 locks the run folder and plans (``plan``); every rank receives the
    plan, or raises the same RunFolderError. Rank 0 also gets the lock to hold."""
    import torch.distributed as dist

    out = os.path.abspath(cfg.output.dir)
    decision, lock = None, None
    if dist.get_rank() == 0:
        try:  # whatever goes wrong here, every rank must hear of it rather than wait
            os.makedirs(out, exist_ok=True)
            lock = RunLock(out)
            note = lock.acquire()
            try:
                decision = plan(out, cfg.to_dict(), world_size, cfg.output.fresh_start)
            except BaseException:
                lock.release()
                raise
            if note:
                decision["notes"].insert(0, note)
        except (RunFolderError, OSError, ValueError) as exc:
            decision, lock = {"error": str(exc)}, None
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise RunFolderError(box[0]["error"])
    return box[0], lock
