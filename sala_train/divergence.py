"""A run whose loss is no longer a number: stop it, and fail it without a final model.

Once the weights hold NaN every later step is wasted compute, and the Trainer would go on to
``max_steps`` (hours on a GPU) saving NaN checkpoints. Training stops when two logged train losses
in a row are not finite: one alone can be a passing fp16 overflow, whose step the loss scaler skips.
A checkpoint is only published when its trained weights are all finite (``weights_finite``), so a
resume, an export or pruning never takes a NaN checkpoint for a good one.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback


def diverged(log_history: list[dict[str, Any]]) -> str | None:
    """What shows the run diverged (its last train or eval loss is not finite), or None."""
    for key in ("eval_loss", "loss"):
        last = next((entry for entry in reversed(log_history) if key in entry), None)
        if last is not None and not math.isfinite(last[key]):
            return f"{key} is {last[key]} at step {last.get('step')}"
    return None


def not_finite_from_the_start(log_history: list[dict[str, Any]]) -> str | None:
    """What shows the loss was not finite before any update (step 0's evaluation, or step 1's
    training loss, computed on the weights as loaded) and never since, or None: no learning rate
    caused that. (A finite training loss at any step means the model computed one: a step 1 that
    overflowed once, or a NaN of the validation data alone, diverged otherwise.)"""
    if any("loss" in entry and math.isfinite(entry["loss"]) for entry in log_history):
        return None
    for entry in log_history:
        for key, step in (("eval_loss", 0), ("loss", 1)):
            if entry.get("step") == step and key in entry and not math.isfinite(entry[key]):
                return f"{key} was already {entry[key]} at step {step}, before any update"
    return None


class StopWhenDiverged(TrainerCallback):  # type: ignore[misc]
    """Stops training at the second non-finite train loss in a row (the same on every rank: the
    logged loss is the mean over ranks). Also logs the last step: the Trainer logs only every
    ``logging_steps``, so the steps after the last such one were never logged (a loss gone NaN
    there went unseen, and metrics.jsonl and loss.png ended short of the run)."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        self.in_a_row = 0 if math.isfinite(logs["loss"]) else self.in_a_row + 1
        if self.in_a_row >= 2:
            control.should_training_stop = True


def weights_finite(model: Any) -> bool:
    """Whether every trained weight is finite on every rank: one flag, reduced once per save.
    Frozen weights are left out (they never change); each rank checks the part it holds (ZeRO-3's
    partition, an FSDP2 shard), so a sharded model is never gathered for it."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    device = torch.device("cpu")
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    checks = []
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            held = _held_part(param)
            if held.numel():
                checks.append(torch.isfinite(held).all())  # (read back once, below: no sync per tensor)
    finite = torch.ones((), dtype=torch.bool)
    if checks:  # (stacked where the weights are, then moved once)
        finite = torch.stack([check.to(checks[0].device) for check in checks]).all()
    finite = finite.to(device=device if distributed else finite.device, dtype=torch.int32)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _held_part(param: Any) -> Any:
    """The elements of ``param`` this rank holds: its ZeRO-3 partition less the padding that
    evens the partitions out (DeepSpeed allocates it with ``torch.empty`` and never writes it, so it
    may hold anything, NaN included), an FSDP2 shard (a DTensor's local part), or all of it."""
    partition = getattr(param, "ds_tensor", None)  # (ZeRO-3: the full parameter is empty here)
    if partition is None:
        return param.to_local() if hasattr(param, "to_local") else param
    size = partition.ds_numel
    rank = getattr(param, "ds_zero_partition_rank", None)
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank(group=param.ds_process_group)
    return partition.narrow(0, 0, max(0, min(size, param.ds_numel - size * rank)))
