"""The validation loss of several processes, equal to the one a single process computes.

Why by hand: the Trainer (transformers 5) repeats each rank's batch loss ``batch_size`` times,
gathers, and cuts the gathered list at the dataset's remainder, which assumes one entry per sample
in rank order; with uneven batches that cut drops later ranks' real losses (and keeps padding
duplicates), so a 2-process eval loss came out as rank 0's share only (6.9481 against 6.9154 on
the demo). Here the batches are formed exactly as one process forms them (in order,
``per_device_eval_batch_size`` samples), dealt to the ranks in turn, and the sample-weighted sum
of batch losses and the sample count are all-reduced: the single-process figure, whatever the
world size. Every rank runs the same number of forward passes (a rank without a batch in the last
round repeats its first one with weight 0), so ZeRO-3 and FSDP, which gather parameters in every
forward, never wait on a rank that stopped.
"""

from __future__ import annotations

import math
import time
from typing import Any


def sample_weighted_eval_loss(trainer: Any) -> tuple[float, int, int]:
    """(loss, samples, rounds): the mean over validation samples of their batch's token-mean loss."""
    import torch
    import torch.distributed as dist

    dataset, collator = trainer.eval_dataset, trainer.data_collator
    size, world, rank = trainer.args.per_device_eval_batch_size, trainer.args.world_size, trainer.args.process_index
    batches = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
    rounds = math.ceil(len(batches) / world)
    model = trainer.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)  # sum of n_b * loss_b, sum of n_b
    with torch.no_grad():
        for turn in range(rounds):
            index = turn * world + rank
            weight = 1.0 if index < len(batches) else 0.0
            samples = batches[index] if weight else batches[0]
            inputs = trainer._prepare_inputs(collator([dataset[i] for i in samples]))
            with trainer.compute_loss_context_manager():
                loss = model(**inputs, use_cache=False).loss
            total += torch.tensor([weight * len(samples) * loss.double().item(), weight * len(samples)],
                                  dtype=torch.float64, device=total.device)  # fmt: skip
    dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]), int(total[1]), rounds


def evaluate_across_ranks(trainer: Any, metric_key_prefix: str = "eval") -> dict[str, float]:
    """``Trainer.evaluate`` for several processes: the same metrics, logged and announced to the
    callbacks the same way."""
    start = time.time()
    loss, samples, rounds = sample_weighted_eval_loss(trainer)
    runtime = time.time() - start
    metrics = {
        f"{metric_key_prefix}_loss": loss,
        f"{metric_key_prefix}_runtime": round(runtime, 4),
        f"{metric_key_prefix}_samples_per_second": round(samples / runtime, 3) if runtime else 0.0,
        f"{metric_key_prefix}_steps_per_second": round(rounds / runtime, 3) if runtime else 0.0,
    }
    trainer.log(metrics)
    trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
    return metrics
