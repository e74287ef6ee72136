"""The eval figures ``train.metric_for_best_model`` may name (``train.load_best_model_at_end``)."""

from __future__ import annotations

# By stage: every stage's eval loss, and the preference figures TRL records whose larger value is
# better (a margin or an accuracy; its log-probabilities and logits rank nothing).
METRICS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "sft": ("loss",),
    "pretrain": ("loss",),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "kto": ("loss", "rewards/margins"),
}


def metric_name(metric: str) -> str:
    """The figure's name as the stage's evaluation reports it, less ``eval_`` (which the Trainer,
    and LLaMA-Factory's ``metric_for_best_model: eval_loss``, also accept)."""
    return metric.removeprefix("eval_")


def greater_is_better(metric: str) -> bool:
    """The Trainer's rule: a loss is better lower, any other figure higher."""
    return not metric.endswith("loss")
