"""Full fine-tuning or LoRA: the one place that dispatches on ``method``."""

from __future__ import annotations

from typing import Any

from sala_train.config.schema import FullMethod, LoraMethod, MethodConfig, ModelConfig
from sala_train.config.typed import ConfigError

ALL_LINEAR = "all-linear"  # peft: every linear layer except the output head


def lora_targets(method: LoraMethod, model_cfg: ModelConfig) -> list[str] | str:
    return method.target_modules or model_cfg.lora_target_modules or ALL_LINEAR


def apply_method(method: MethodConfig, model: Any, model_cfg: ModelConfig, gradient_checkpointing: bool) -> Any:
    """Return the model ready to train under ``method``."""
    match method:
        case FullMethod():
            return model
        case LoraMethod():
            from peft import LoraConfig, get_peft_model

            if gradient_checkpointing:
                # Frozen embeddings give checkpointed blocks inputs without grad; LoRA needs them.
                model.enable_input_require_grads()
            targets = lora_targets(method, model_cfg)
            config = LoraConfig(
                r=method.r,
                lora_alpha=method.alpha,
                lora_dropout=method.dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            )
            try:
                return get_peft_model(model, config)
            except ValueError as exc:
                key = "method.target_modules" if method.target_modules else "model.lora_target_modules"
                raise ConfigError([f"{key}={targets}: {exc}"]) from exc
