"""One process of a multi-process training run, for test_distributed.py: torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR/PORT) is set by hand and `train` runs as under torchrun."""
import json
import os
from pathlib import Path

import torch


KILLED = 17  # exit status of a process "killed" mid-run


def run_rank(rank: int, world: int, port: int, settings: dict, stop_at: int | None,
             report: str, kill_at: int | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lorafleet.train import TrainConfig, distributed, train

    def stop(event):  # only rank 0 asks: every rank must still stop at the same step
        if event["type"] == "step" and event["step"] == kill_at:
            os._exit(KILLED)  # no checkpoint, no cleanup: as if the job were killed
        return rank == 0 and event["type"] == "step" and event["step"] == stop_at

    try:
        result = train(TrainConfig.from_flat(**settings), callback=stop)
        if rank == 0:
            Path(report).write_text(json.dumps({
                "steps": result.steps, "interrupted": result.interrupted,
                "losses": [e["loss"] for e in result.history if e["type"] == "step"]}))
    finally:
        distributed.cleanup()
