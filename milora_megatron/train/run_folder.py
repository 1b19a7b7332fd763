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
from dataclasses import dataclass, field

from ..checkpoint.adapters import CHECKPOINTS, candidates, newest_complete
from ..checkpoint.atomic import PARTIAL_SUFFIX, write_json_atomic
from ..errors import RunFolderError, UserError, as_user_error
from ..schema import fixed_keys
from .config import fixed_on_resume
from .state import optimizer_file, rank_file

LOCK = "run.lock"
STALE_AFTER_S = 900.0
CONFIG = "config.json"
RUN = "run.json"
RUN_FILES = (CONFIG, RUN, "metrics.jsonl", CHECKPOINTS)


@dataclass
class ResumePlan:
    """What rank 0 decided to do with the run folder, the same on every rank."""

    resume: str | None = None  # the checkpoint to resume from; None: start at step 0
    notes: list[str] = field(default_factory=list)  # said when the run starts or resumes
    relayout: bool = False  # resumed at another layout (from the layout-free state)
    saved_stages: int = 1  # the saved run's pipeline stages
    changed: list[str] = field(default_factory=list)  # ``key: saved -> now`` a resume may change
    data: dict | None = None  # run.json's record of the data the run trained on


@dataclass
class RunFolder:
    """A run folder prepared for a run: the plan, and on rank 0 the lock it holds."""

    plan: ResumePlan
    lock: "RunLock | None" = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


MARKER = ".milora-run"  # written into a folder the moment a run takes it: "this folder is a run's"
OWN_FILES = (MARKER, LOCK)


class RunLockedError(RunFolderError):
    pass


def _process_start(pid: int) -> float | None:
    """When ``pid`` started, or None if no such process lives (a killed process that its
    parent has not reaped yet, a zombie, is dead too)."""
    try:
        import psutil

        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
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


def _flatten(config: dict) -> dict:
    """``section.key -> value``; a value may itself be a mapping (data.columns)."""
    return {f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def resume_conflicts(saved: dict, now: dict, schema=None) -> list[str]:
    """``key: saved -> now`` for every key a rerun changed that ``schema`` (the run config's)
    marks fixed on resume: what the factors' shapes and meaning, the samples and their order,
    and the per-rank state's layout depend on. Of the keys ``saved`` records (an older run's
    config may lack a newer key). data.revision is not one: the commit it resolves to must
    stay (``inputs.check_same_data``)."""
    keys = fixed_keys(schema) if schema is not None else fixed_on_resume()
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if k in a and a.get(k) != b.get(k)]


def changed_keys(saved: dict, now: dict) -> list[str]:
    """``key: saved -> now`` for every key a resume changed (what it may change: lr, iters, ...)."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def claim(out: str) -> None:
    """Make ``out`` this run's, or refuse: a run writes only into a new or empty folder, or one
    a run created (its marker, or the ``run.json`` of a run from before the marker). An HF
    model folder or a base checkpoint given as ``output.dir`` would otherwise be overwritten."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"output.dir {out} is a file, not a folder")
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if present and not any(name in present for name in (MARKER, RUN)):
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise RunFolderError(f"output.dir {out} is not empty and is not a run folder (it holds {shown}; no {RUN}): "
                             "a run writes only into a new or empty folder, or a run folder it created; "
                             "choose another output.dir")
    os.makedirs(out, exist_ok=True)
    if MARKER not in present:
        write_json_atomic(os.path.join(out, MARKER), {"created": time.time(), "by": "milora-megatron"})


def _read(out: str, name: str) -> dict | None:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise RunFolderError(f"{path} is not valid JSON ({exc}); repair it or use output.fresh_start=true") from None


def plan(out: str, config: dict, world_size: int, fresh_start: bool) -> ResumePlan:
    """What this run does with ``out`` (rank 0 decides, before any expensive work); raises
    RunFolderError when it must not go on."""
    checkpoints = os.path.join(out, CHECKPOINTS)
    # an interrupted save (step_N.partial) is not a checkpoint; a lone ``latest`` points at nothing
    has_checkpoints = bool(candidates(out))
    interrupted = sorted(p for p in os.listdir(checkpoints) if p.endswith(PARTIAL_SUFFIX)) \
        if os.path.isdir(checkpoints) else []
    if fresh_start and (has_checkpoints or os.path.exists(os.path.join(out, CONFIG))):
        keep = os.path.join(out, f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(keep)
        for name in RUN_FILES:
            if os.path.exists(os.path.join(out, name)):
                shutil.move(os.path.join(out, name), keep)
        return ResumePlan(notes=[f"output.fresh_start: the previous run was moved to {keep}"])
    if not has_checkpoints:
        for name in interrupted:  # no live writer: this run holds the folder's lock
            shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)
        notes = ([f"{', '.join(interrupted)}: an interrupted save, not a checkpoint (removed); no complete "
                  "checkpoint, so training starts from the beginning"] if interrupted else [])
        return ResumePlan(notes=notes)
    saved, run = _read(out, CONFIG), _read(out, RUN) or {}
    conflicts = resume_conflicts(saved, config) if saved is not None else []
    if conflicts:
        raise RunFolderError(f"{out} was trained with other settings that a resume cannot change "
                             f"({'; '.join(conflicts)}); use another output.dir, or output.fresh_start=true")
    parallel = config.get("parallel", {})
    tp = parallel.get("tp", 1)
    # an MoE run records its expert layout too (ep, expert TP); a dense run's is (1, tp)
    now = (world_size, tp, parallel.get("pp", 1), parallel.get("ep", 1), parallel.get("etp") or tp)
    then_tp = run.get("tp", now[1])
    then = (run.get("world_size", world_size), then_tp, run.get("pp", now[2]), run.get("ep", 1),
            run.get("etp", then_tp))
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
    # the checkpoint's own record decides too: config.json may be gone or replaced
    recorded = ckpt.meta.get("run_config") or {"peft": ckpt.meta.get("peft", {})}
    conflicts = resume_conflicts(recorded, config)
    if conflicts:
        raise RunFolderError(f"{ckpt.path} was trained with other settings that a resume cannot change "
                             f"({'; '.join(conflicts)}); use another output.dir, or output.fresh_start=true")
    changed = changed_keys(ckpt.meta["run_config"] if "run_config" in ckpt.meta else saved or {}, config)
    if not ckpt.verified:
        notes.append(f"{ckpt.path} predates checksums: loaded unverified")
    if relayout:
        notes.append(f"resuming on another layout: {_layout(then)} -> {_layout(now)} (factors and AdamW state "
                     "re-sharded; dropout streams are reseeded)")
    return ResumePlan(ckpt.path, notes, relayout, then[2], changed, run.get("data"))


def _layout(layout: tuple[int, int, int, int, int]) -> str:
    world, tp, pp, ep, etp = layout
    experts = f", EP={ep} expert-TP={etp}" if (ep, etp) != (1, tp) else ""
    return f"TP={tp} x PP={pp} x DP={world // max(tp * pp, 1)}{experts} ({world} processes)"


def prepare(cfg, world_size: int, host_group=None) -> RunFolder:
    """Collective over ``host_group`` (gloo; None: the default group): rank 0 locks the run
    folder and plans (``plan``); every rank receives the plan, or raises the same error.
    Rank 0's RunFolder holds the lock."""
    import torch.distributed as dist

    out = os.path.abspath(cfg.output.dir)
    decision, lock, failure = None, None, None
    if dist.get_rank() == 0:
        try:  # whatever goes wrong here, every rank must hear of it rather than wait
            claim(out)
            lock = RunLock(out)
            note = lock.acquire()
            try:
                decision = plan(out, cfg.to_dict(), world_size, cfg.output.fresh_start)
            except BaseException:
                lock.release()
                raise
            if note:
                decision.notes.insert(0, note)
        except Exception as exc:
            failure = as_user_error(exc, out)
            decision, lock = {"error": str(failure), "user": isinstance(failure, UserError)}, None
    box = [decision]
    dist.broadcast_object_list(box, src=0, group=host_group)
    if isinstance(box[0], dict):
        if failure is not None and not box[0]["user"]:
            raise failure  # a bug: rank 0 keeps its traceback
        if not box[0]["user"]:
            raise RuntimeError(f"rank 0 failed while preparing the run folder: {box[0]['error']}")
        raise failure if isinstance(failure, UserError) else RunFolderError(box[0]["error"])
    return RunFolder(box[0], lock)
