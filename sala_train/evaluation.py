"""Validation figures of several processes, equal to the ones a single process computes.

Why by hand: the Trainer (transformers 5) repeats each rank's batch loss ``batch_size`` times,
gathers, and cuts the gathered list at the dataset's remainder, which assumes one entry per sample
in rank order; with uneven batches that cut drops later ranks' real losses (and keeps padding
duplicates), so a 2-process eval loss came out as rank 0's share only (6.9481 against 6.9154 on
the demo). TRL's DPO and KTO metrics (rewards, log-probabilities, KL) are gathered across the
ranks inside each step, padding duplicates included, then averaged per step, so they depend on
the world size too, and on one process a short last batch counts as much as a full one.

Here the batches are formed exactly as one process forms them (in order,
``per_device_eval_batch_size`` samples), dealt to the ranks in turn, and for every figure the
weighted sum of its batch values (by samples; the loss of SFT and pre-training by trained tokens)
and the weights are all-reduced: the same figures whatever the world size. One process evaluates
the same way. Every rank runs the same number of forward passes (a rank without a
batch in the last round repeats its first one with weight 0), so ZeRO-3 and FSDP, which gather
parameters in every forward, never wait on a rank that stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sala_train.data.chat import IGNORE_INDEX

# A batch's figures by name ("loss", TRL's "rewards/chosen", ...), from the model and the batch: a
# value (a mean over the batch's samples), or (value, weight) for a mean over part of the batch
# (KTO's desirable samples, say), weighted by how many it averages.
BatchFigures = Callable[[Any, dict[str, Any]], dict[str, float | tuple[float, float]]]


def _eval_rows(trainer: Any, dataset: Any = None) -> Any:
    """``dataset`` (by default the validation set) as the Trainer's own eval dataloader reads it
    (unused columns removed)."""
    import datasets

    dataset = trainer.eval_dataset if dataset is None else dataset
    if isinstance(dataset, datasets.Dataset):
        return trainer._remove_unused_columns(dataset, description="evaluation")
    return dataset


def sample_weighted_figures(
    trainer: Any, figures_of: BatchFigures, dataset: Any = None
) -> tuple[dict[str, float], int, int]:
    """({name: mean over the samples of ``dataset`` (by default the validation set) of their batch's
    figure}, samples, rounds), with the model in eval mode (the caller's to restore). A figure a
    batch does not report is averaged over the batches that do."""
    import torch

    from sala_train.data.batching import read_rows

    dataset, collator = _eval_rows(trainer, dataset), trainer.data_collator
    size, world, rank = trainer.args.per_device_eval_batch_size, trainer.args.world_size, trainer.args.process_index
    batches = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
    rounds = math.ceil(len(batches) / world)
    model = trainer.model
    model.eval()
    sums: dict[str, list[float]] = {}  # name -> [sum of n_b * value_b, sum of n_b]
    samples_here = 0.0
    with torch.no_grad():
        for turn in range(rounds):
            index = turn * world + rank
            weight = 1.0 if index < len(batches) else 0.0
            samples = batches[index] if weight else batches[0]
            inputs = trainer._prepare_inputs(collator(read_rows(dataset, samples)))
            with trainer.compute_loss_context_manager():
                figures = figures_of(model, inputs)
            n = weight * len(samples)
            samples_here += n
            for name, figure in figures.items():
                value, count = figure if isinstance(figure, tuple) else (figure, len(samples))
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += weight * count * float(value)
                total[1] += weight * count
    names, totals = _all_reduced(sums, samples_here, trainer.args.device)
    means = {name: float(totals[i, 0] / totals[i, 1]) for i, name in enumerate(names) if totals[i, 1] > 0}
    if "rewards/margins" not in means and {"rewards/chosen", "rewards/rejected"} <= set(means):
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]  # (KTO: of the means)
    return means, int(totals[-1, 1]), rounds


def _all_reduced(sums: dict[str, list[float]], samples: float, device: Any) -> tuple[list[str], Any]:
    """Every rank's sums added up, row by name (the names any rank saw, in one order), plus a last
    row holding the sample count."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    names = set(sums)
    if distributed:
        seen: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, sorted(names))
        names = {name for rank_names in seen for name in rank_names}
    ordered = sorted(names)
    rows = [sums.get(name, [0.0, 0.0]) for name in ordered] + [[0.0, samples]]
    totals = torch.tensor(rows, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
    return ordered, totals.cpu()


def evaluate_by_samples(
    trainer: Any, figures_of: BatchFigures, metric_key_prefix: str = "eval", dataset: Any = None
) -> dict[str, float]:
    """``Trainer.evaluate`` with sample-weighted figures: the same metrics, logged and announced
    to the callbacks the same way (while the model is in eval mode, as the Trainer does)."""
    was_training = trainer.model.training
    start = time.time()
    try:
        figures, samples, rounds = sample_weighted_figures(trainer, figures_of, dataset)
        runtime = time.time() - start
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in figures.items()}
        metrics |= {
            f"{metric_key_prefix}_runtime": round(runtime, 4),
            f"{metric_key_prefix}_samples_per_second": round(samples / runtime, 3) if runtime else 0.0,
            f"{metric_key_prefix}_steps_per_second": round(rounds / runtime, 3) if runtime else 0.0,
        }
        trainer.log(metrics)
    finally:
        trainer.model.train(was_training)
    trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
    return metrics


def model_loss(model: Any, inputs: dict[str, Any]) -> dict[str, float | tuple[float, float]]:
    """A causal LM's own loss on a batch (SFT, continual pre-training), the mean over its trained
    tokens, weighted by their count: the validation loss is then the mean over every trained token
    of the set, whatever the batch size (weighted by samples, as the Trainer does, it moved with
    ``per_device_eval_batch_size``: 2.7291 at 1, 2.7623 at 16 for the same weights) or packing."""
    loss = model(**inputs, use_cache=False).loss  # (on every rank: ZeRO-3 and FSDP gather in each forward)
    tokens = float((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())  # (the loss shifts labels by one)
    return {"loss": (float(loss), tokens)} if tokens else {}  # (no trained token: its loss is 0/0)


def trl_figures(trainer: Any) -> BatchFigures:
    """A TRL preference trainer's loss and the metrics it records for one batch: its
    ``compute_loss`` (which also runs the reference model and, for KTO, the KL estimate) with its
    cross-rank gathers kept to this rank's batch, then the values it appended to ``_metrics``."""

    def figures_of(model: Any, inputs: dict[str, Any]) -> dict[str, float]:
        recorded = trainer._metrics["eval"]
        recorded.clear()
        with _gathers_of_this_rank_only(trainer.accelerator):
            loss = trainer.compute_loss(model, inputs)
        # num_tokens is the count of training tokens so far, not a figure of this batch.
        figures: dict[str, float | tuple[float, float]] = {
            name: values[-1] for name, values in recorded.items() if values and name != "num_tokens"
        }
        recorded.clear()
        if "label" in inputs:  # KTO: its figures average over the batch's desirable or undesirable part
            figures = _kto_weighted(figures, inputs)
        figures = _token_weighted(figures, inputs)
        return {"loss": float(loss), **figures}

    return figures_of


def _kto_weighted(figures: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float | tuple[float, float]]:
    """KTO's rewards and log-probabilities are means over the batch's desirable (``chosen``) or
    undesirable samples, its logits over their completion tokens: weighted by those counts (by the
    batch's size they depended on the eval batch size). The margin is taken of the final means."""
    label = inputs["label"].bool()
    tokens = inputs["completion_mask"][:, 1:]  # (TRL's shifted mask: the tokens it averages logits over)
    counts = {"chosen": (float(label.sum()), float(tokens[label].sum())),
              "rejected": (float((~label).sum()), float(tokens[~label].sum()))}  # fmt: skip
    out: dict[str, float | tuple[float, float]] = {}
    for name, value in figures.items():
        kind, _, part = name.partition("/")
        if name == "rewards/margins":
            continue
        if kind in ("rewards", "logps") and part in counts:
            out[name] = (value, counts[part][0])
        elif kind == "logits" and part in counts:
            out[name] = (value, counts[part][1])
        else:
            out[name] = value
    return out


def _token_weighted(figures: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float | tuple[float, float]]:
    """TRL's figures that are means over completion tokens, weighted by those counts (weighted by
    the batch's samples, they moved with the eval batch size: DPO's logits by 1.6%): entropy over
    every completion token; DPO's (rows: chosen, then rejected) logits over each half's, and its
    token accuracy over the chosen ones'. As TRL counts them: the completion mask shifted by one."""
    if "completion_mask" not in inputs:
        return figures
    tokens = inputs["completion_mask"][:, 1:]
    counts = {"entropy": float(tokens.sum())}
    if "label" not in inputs:  # DPO
        chosen, rejected = (float(half.sum()) for half in tokens.chunk(2, dim=0))
        counts |= {"logits/chosen": chosen, "logits/rejected": rejected, "mean_token_accuracy": chosen}
    return {name: (value, counts[name]) if name in counts and not isinstance(value, tuple) else value
            for name, value in figures.items()}  # fmt: skip


def _unchanged(data: Any, *args: Any, **kwargs: Any) -> Any:
    return data


@contextmanager
def _gathers_of_this_rank_only(accelerator: Any) -> Iterator[None]:
    """TRL gathers each step's metrics across the ranks inside ``compute_loss``; here each rank
    holds a different batch whose figures are summed after all, so those gathers return the
    rank's own values (instance attributes shadowing the methods, removed again after)."""
    accelerator.gather = accelerator.gather_for_metrics = _unchanged
    try:
        yield
    finally:
        del accelerator.gather, accelerator.gather_for_metrics
