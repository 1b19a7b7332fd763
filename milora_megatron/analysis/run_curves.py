"""Several runs on one figure: training loss, validation and forgetting loss, learning rate
and tokens/s from each run folder's metrics.jsonl, so a MiLoRA run and a LoRA run can be
compared at a glance (the forgetting panel is the trade-off the paper is about)."""

from __future__ import annotations

import json
import os

import matplotlib

from ..errors import DataError, MissingPathError
from .outputs import output_error

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("loss", "training loss"), ("valid_loss", "validation loss"), ("forgetting_loss", "forgetting loss"),
          ("lr", "learning rate"), ("tokens_per_s", "tokens / s"))


def read_run(run_dir: str) -> dict:
    """{key: ([steps], [values])} for every panel key, the last record of each step (a
    resumed run repeats the steps after its checkpoint), and the run's label."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise MissingPathError(f"run folder {run_dir} does not exist")
    if not os.path.isfile(path):
        raise MissingPathError(f"{run_dir} has no metrics.jsonl (is it a run folder?)")
    per_key: dict[str, dict[int, float]] = {key: {} for key, _ in PANELS}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as exc:
                if line.endswith("\n"):
                    raise DataError(f"{path} line {number} is not JSON ({exc})") from None
                continue  # the last line of a run still writing (or killed mid-write)
            if not isinstance(r, dict) or not isinstance(r.get("step"), (int, float)):
                continue
            for key in per_key:
                if isinstance(r.get(key), (int, float)):
                    per_key[key][int(r["step"])] = float(r[key])
    label = os.path.basename(os.path.normpath(run_dir))
    config = os.path.join(run_dir, "config.json")
    if os.path.isfile(config):
        try:
            with open(config) as f:
                cfg = json.load(f)
        except ValueError as exc:
            raise DataError(f"{config} is not valid JSON ({exc})") from None
        cfg = cfg if isinstance(cfg, dict) else {}
        peft, train = cfg.get("peft") or {}, cfg.get("train") or {}
        lr = train.get("lr")
        lr = f"{lr:g}" if isinstance(lr, (int, float)) else "?"
        label = f"{label} ({peft.get('method', '?')} r={peft.get('rank', '?')}, lr={lr})"
    return {"label": label, **{k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in per_key.items()}}


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
    runs = [read_run(d) for d in run_dirs]
    if labels:
        for run, label in zip(runs, labels):
            run["label"] = label
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        drawn = False
        for run in runs:
            steps, values = run[key]
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=run["label"])
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise output_error(exc, out) from exc
    finally:
        plt.close(fig)
    return out

