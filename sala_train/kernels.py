"""Liger's fused kernels (``model.liger``): on where they are known to be right, never silently.

Liger replaces RMSNorm, RoPE, SwiGLU and the final linear + cross-entropy with Triton kernels
(CUDA). Its fused cross-entropy computes logits itself, so a model that scales its logits before
the loss (MiniCPM's muP: ``hidden / (hidden_size / dim_model_base)``) would train on the wrong
logits: ``auto`` leaves such models alone and ``true`` refuses them. It reads ``lm_head.weight``
without running ``lm_head``, which ZeRO-3 needs to gather it: ``auto`` is off under ZeRO-3 too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sala_train.config.schema import BackendConfig, LigerMode, ModelConfig, Zero3Backend
from sala_train.errors import ModelLoadError

# Config values by which a model scales its logits (MiniCPM's muP base, Cohere's logit_scale,
# Granite's logits_scaling, Falcon-H1's lm_head_multiplier...): Liger's fused loss computes
# from lm_head(h) and skips them. (Every scale TRL is told of, stages.preference.TRL_LOGIT_SCALES.)
MUP_ATTRIBUTES = ("dim_model_base", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def check_liger_possible(cfg: ModelConfig) -> None:
    """Before any model loads: ``model.liger=true`` needs CUDA and the liger-kernel package."""
    if cfg.liger != LigerMode.TRUE:
        return
    if not torch.cuda.is_available():
        raise ModelLoadError("model.liger=true needs a CUDA GPU (Liger's kernels are Triton); use model.liger=auto")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ModelLoadError("model.liger=true needs the liger-kernel package: pip install liger-kernel")


def _unsupported_reason(model: Any) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    scaled = [a for a in MUP_ATTRIBUTES if getattr(config, a, None) not in (None, 1, 1.0)]
    if scaled:
        return f"{model_type} scales its logits ({scaled[0]}), which Liger's fused cross-entropy would skip"
    from sala_train.stages.token_loss import why_the_loss_is_computed_here

    computed_here = why_the_loss_is_computed_here(model)
    if computed_here is not None:  # (its fused loss makes no logits, and the Trainer's eval then fails on it)
        return f"sala-train computes its loss from the logits ({computed_here}), which Liger's fused loss never makes"
    if _has_adapter(model.get_output_embeddings()):
        # Its fused loss reads lm_head.weight: under peft, the frozen base weight, adapter left out.
        return "LoRA adapts lm_head, which Liger's fused cross-entropy would bypass (the adapter would not train)"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def _has_adapter(module: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def use_liger(cfg: ModelConfig, backend: BackendConfig, model: Any) -> bool:
    """Whether the Trainer should apply Liger to this loaded model under this backend."""
    if cfg.liger == LigerMode.FALSE:
        return False
    if cfg.liger == LigerMode.AUTO and (
        not torch.cuda.is_available()
        or importlib.util.find_spec("liger_kernel") is None
        or isinstance(backend, Zero3Backend)  # (its fused loss fails there: validate._check_liger_backend)
    ):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = _unsupported_reason(base)
    if reason is None:
        return True
    if cfg.liger == LigerMode.TRUE:
        raise ModelLoadError(f"model.liger=true: {reason}; use model.liger=auto or false")
    return False
