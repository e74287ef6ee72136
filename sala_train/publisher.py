"""The Trainer callback that publishes checkpoints (see ``sala_train.checkpoints``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sala_train.checkpoints import prune, publish


class CheckpointPublisher(TrainerCallback):
    """Publishes each checkpoint once every rank has written it, then prunes old ones."""

    def __init__(self, run_dir: Path, save_total_limit: int | None):
        self.run_dir = run_dir
        self.save_total_limit = save_total_limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if state.is_world_process_zero:
            publish(self.run_dir / f"checkpoint-{state.global_step}", state.global_step)
            prune(self.run_dir, self.save_total_limit)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
