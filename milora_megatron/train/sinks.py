"""Where metrics go besides metrics.jsonl and the console: TensorBoard event files in the run
folder, and Weights & Biases when a project is named. Each sink takes the same records
``MetricsLog`` writes; a sink never stops training."""

from __future__ import annotations

import os
import secrets

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id"

# record key -> scalar tag (the keys not listed here are not scalars worth plotting)
TRAIN = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
         "step_time_s": "train/step_time_s", "loss_scale": "train/loss_scale", "epoch": "train/epoch",
         "gpu_mem_gib": "system/gpu_mem_gib", "gpu_util": "system/gpu_util", "gpu_power_w": "system/gpu_power_w"}
EVAL = {"valid_loss": "eval/valid_loss", "forgetting_loss": "eval/forgetting_loss"}


def scalars(record: dict) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) of a record, or None when it holds nothing to plot."""
    if record.get("event") == "init":
        return 0, {"init/init_s": float(record["init_s"])}
    table = EVAL if record.get("event") == "eval" else TRAIN if "loss" in record else None
    if table is None or "step" not in record:
        return None
    values = {tag: float(record[k]) for k, tag in table.items() if isinstance(record.get(k), (int, float))}
    return (int(record["step"]), values) if values else None


class TensorBoardSink:
    """``torch.utils.tensorboard`` event files under ``RUN/tensorboard``. Opened at the first
    step it sees, purging later steps a resumed run trains again."""

    def __init__(self, run_dir: str):
        self.dir = os.path.join(run_dir, TENSORBOARD_DIR)
        self.writer = None

    def log(self, record: dict) -> None:
        found = scalars(record)
        if found is None:
            return
        step, values = found
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.dir, purge_step=step if step > 0 else None)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """One W&B run per run folder (its id kept in ``RUN/wandb_id``, so a resume continues it);
    offline with ``WANDB_MODE=offline``, the files under ``RUN/wandb``."""

    def __init__(self, run_dir: str, project: str, config: dict):
        import wandb

        id_file = os.path.join(run_dir, WANDB_ID_FILE)
        if os.path.isfile(id_file):
            run_id = open(id_file).read().strip()
        else:
            run_id = secrets.token_hex(4)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=run_dir, config=config,
                              name=os.path.basename(os.path.normpath(run_dir)))

    def log(self, record: dict) -> None:
        found = scalars(record)
        if found is not None:
            step, values = found
            self.run.log({**values, "step": step})

    def close(self) -> None:
        self.run.finish()

