"""Where a run's numbers go: log.jsonl always (one object per step / evaluation; `lorafleet plot`
reads it), plus TensorBoard or Weights & Biases when asked (`report_to`).

Nothing is reported anywhere by default: a run that happens to have tensorboard or wandb
installed writes the same files as one that has not. wandb runs offline unless the user's
WANDB_MODE says otherwise, so a run never needs the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lorafleet.errors import ConfigError


class RunLog:
    def __init__(self, out: Path, enabled: bool, report_to: str = "none",
                 config: dict | None = None):
        self.file = (out / "log.jsonl").open("a") if enabled else None
        self.tb = self.wandb = None
        if not enabled or report_to == "none":
            return
        if report_to not in ("tensorboard", "wandb"):
            raise ConfigError(f"report_to must be none, tensorboard or wandb (found "
                              f"{report_to!r})")
        try:
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
            else:
                import wandb
        except ImportError as exc:
            self.close()
            raise ConfigError(f"--report-to {report_to} needs the {report_to} package (pip "
                              f"install 'lorafleet[track]' or {report_to})") from exc
        if report_to == "tensorboard":
            self.tb = SummaryWriter(str(out / "tensorboard"))
        else:
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(dir=str(out), config=config, name=out.name)

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def read_log(out: str | Path) -> list[dict]:
    """The records of a run's log.jsonl (a run folder or the file itself)."""
    path = Path(out)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{path}: no log.jsonl (is this a `lorafleet train` output folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
