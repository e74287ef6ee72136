"""The SFT loss as a mean over every trained token of an optimizer step, whatever the model's code.

transformers' own causal LMs compute their loss with ``self.loss_function``, which divides the
summed cross-entropy by ``num_items_in_batch``, the trained tokens of the whole accumulated batch
on every rank: one step of batch 2 × 4 accumulation, or of 2 processes × 4, is the step of batch
8. A model whose code comes with its weights (``trust_remote_code``: MiniCPM's) may take a plain
mean instead: the Trainer then divides by the accumulation steps (a mean of micro-batch means,
15% off in gradient on samples of mixed lengths), or, where its forward takes ``**kwargs`` and
ignores ``num_items_in_batch``, not at all (a gradient and logged loss × the accumulation steps).
A MoE model with ``output_router_logits`` adds its router loss to each micro-batch's, which the
Trainer does not divide either (× the accumulation steps and processes).

For those models the loss is computed here from the logits with transformers' own
``ForCausalLMLoss`` (the function its models call), given as the Trainer's ``compute_loss_func``;
a router loss is added weighted by the micro-batch's share of the step's trained tokens.
transformers' other models keep their own loss (Liger's fused loss among them, which never
materialises the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IGNORE_INDEX = -100


def why_the_loss_is_computed_here(model: Any) -> str | None:
    """Why the model's own loss cannot be trusted to be the token mean over a whole step (None: it can)."""
    base = _unwrapped(model)
    if getattr(base.config, "output_router_logits", False):
        return "its router loss is added to each micro-batch's loss, which the Trainer does not average"
    if not type(base).__module__.startswith("transformers."):
        return "its code came with the model, and its loss may not divide by the step's trained tokens"
    return None


def token_mean_loss(model: Any) -> Callable[..., Any]:
    """The Trainer's ``compute_loss_func``: the cross-entropy summed over this micro-batch's trained
    tokens, divided by the step's (``num_items_in_batch``; none given: this batch's own)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = _unwrapped(model).config
    router_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        # (a ModelOutput is a dict; a model's own code may return a tuple, the logits first without labels)
        named = isinstance(outputs, dict)
        logits = outputs["logits"] if named else outputs[0]
        value = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if named and router_coef else None
        if aux is not None:
            tokens = (labels[..., 1:] != IGNORE_INDEX).sum()
            share = tokens / num_items_in_batch if num_items_in_batch is not None else 1.0
            value = value + router_coef * aux.to(value.device) * share
        return value

    return loss


def _unwrapped(model: Any) -> Any:
    """The causal LM under peft's wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
