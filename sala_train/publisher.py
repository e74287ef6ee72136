"""The Trainer callback that publishes checkpoints (see ``sala_train.checkpoints``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sala_train.atomic import readable_weights
from sala_train.checkpoints import prune, publish, set_aside
from sala_train.console import say
from sala_train.divergence import weights_finite


class CheckpointPublisher(TrainerCallback):
    """Publishes each checkpoint once every rank has written it, then prunes old ones. A checkpoint
    whose trained weights are not finite is set aside as ``diverged-checkpoint-N`` instead, and
    training stops there: every later step would start from NaN, and pruning after it would have
    removed the last good checkpoint."""

    def __init__(self, run_dir: Path, save_total_limit: int | None, train_data: dict[str, Any] | None = None,
                 keep_best: bool = False):  # fmt: skip
        self.run_dir = run_dir
        self.save_total_limit = save_total_limit
        self.keep_best = keep_best  # (train.load_best_model_at_end: the best checkpoint outlives pruning)
        self.train_data = train_data  # (checkpoints.training_data_signature, kept in each manifest)
        self.diverged_at: int | None = None

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import torch.distributed as dist

        finite = model is None or weights_finite(model)  # (the same answer on every rank)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and finite:
            readable_weights(checkpoint)
            publish(checkpoint, state.global_step, self.train_data)
            prune(self.run_dir, self.save_total_limit, state.best_global_step if self.keep_best else None)
        elif state.is_world_process_zero:
            moved = set_aside(checkpoint, "diverged")
            say(f"sala-train: WARNING: set aside {checkpoint.name} as {moved.name}: its weights are not finite (NaN "
                "or inf); training stops here", sys.stderr)  # fmt: skip
        if not finite:
            self.diverged_at = state.global_step
            control.should_training_stop = True
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
