"""Full fine-tuning or LoRA: the one place that dispatches on ``method``."""

from __future__ import annotations

import warnings
from typing import Any

from sala_train.config.schema import FullMethod, LoraInit, LoraMethod, MethodConfig, ModelConfig
from sala_train.config.typed import ConfigError

ALL_LINEAR = "all-linear"  # peft: every linear layer except the output head
TIED_ADAPTER_WARNING = r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"


def lora_targets(method: LoraMethod, model_cfg: ModelConfig) -> list[str] | str:
    """The LoRA targets: a list of module names, or peft's ``all-linear``. The config reads
    ``method.target_modules=all-linear`` (or ``model.lora_target_modules=all-linear``) as a list of
    one name, which peft would look for as a module: that list means ``all-linear`` too."""
    targets = method.target_modules or model_cfg.lora_target_modules or ALL_LINEAR
    if isinstance(targets, list) and [t.lower() for t in targets] == [ALL_LINEAR]:
        return ALL_LINEAR
    return targets


def _targets_key(method: LoraMethod, model_cfg: ModelConfig) -> str:
    """The key that chose the targets (``method.target_modules`` when neither is set: it is the one to change)."""
    if not method.target_modules and model_cfg.lora_target_modules:
        return "model.lora_target_modules"
    return "method.target_modules"


def _targets_setting(method: LoraMethod, model_cfg: ModelConfig) -> str:
    """``key=value`` for the targets as the user set them, or the default when neither key is set."""
    targets = lora_targets(method, model_cfg)
    if not method.target_modules and not model_cfg.lora_target_modules:
        return f"method.target_modules=null, the default: {targets}"
    return f"{_targets_key(method, model_cfg)}={targets}"


def check_lora_targets(method: MethodConfig, model_cfg: ModelConfig) -> None:
    """``all-linear`` beside other names: peft would take it for a module name that matches
    nothing and adapt only the others, silently. Needs no model (run before one loads)."""
    if not isinstance(method, LoraMethod):
        return
    targets = lora_targets(method, model_cfg)
    if isinstance(targets, list) and ALL_LINEAR in (t.lower() for t in targets):
        raise ConfigError(
            [
                f"{_targets_key(method, model_cfg)}={targets}: all-linear (every linear layer but the output head) "
                f"stands alone; set {_targets_key(method, model_cfg)}=all-linear, or list the modules without it"
            ]
        )


def check_gradient_checkpointing(model: Any, gradient_checkpointing: bool) -> None:
    """The Trainer enables activation checkpointing at its first step, where a model class without
    it raises a ValueError (a traceback and a failed run). Whether the class supports it is known
    once it is loaded (remote code defines its own class): refuse it then, before training."""
    if not gradient_checkpointing:
        return
    from transformers import PreTrainedModel

    if getattr(model, "supports_gradient_checkpointing", True):
        return
    cls = type(model)
    if any(getattr(cls, name, None) is not getattr(PreTrainedModel, name, None)
           for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable")):  # fmt: skip
        return  # its own code enables it (and says so itself if it cannot)
    raise ConfigError(
        [
            f"train.gradient_checkpointing=true: {cls.__name__} does not support activation checkpointing "
            "(its class sets supports_gradient_checkpointing = False); set train.gradient_checkpointing=false"
        ]
    )


def apply_method(method: MethodConfig, model: Any, model_cfg: ModelConfig, gradient_checkpointing: bool) -> Any:
    """Return the model ready to train under ``method``."""
    check_gradient_checkpointing(model, gradient_checkpointing)
    match method:
        case FullMethod():
            return model
        case LoraMethod():
            from peft import LoraConfig, get_peft_model

            check_lora_targets(method, model_cfg)
            if gradient_checkpointing:
                # Frozen embeddings give checkpointed blocks inputs without grad; LoRA needs them.
                model.enable_input_require_grads()
            targets = lora_targets(method, model_cfg)
            config = LoraConfig(
                r=method.r,
                lora_alpha=method.alpha,
                lora_dropout=method.dropout,
                target_modules=targets,
                init_lora_weights=True if method.init is LoraInit.DEFAULT else method.init.value,
                task_type="CAUSAL_LM",
            )
            try:
                with warnings.catch_warnings():
                    # peft warns that an adapter on a head tied to the input embeddings complicates a
                    # merge: sala-export unties the head before it merges (export._untie_adapted_head),
                    # and adapters are saved as safetensors, so the warning asks nothing of the user.
                    warnings.filterwarnings("ignore", message=TIED_ADAPTER_WARNING, category=UserWarning)
                    adapted = get_peft_model(model, config)
                _refuse_targets_that_match_nothing(method, adapted)
                return adapted
            except ValueError as exc:
                if "lora_dropout" in str(exc) and method.dropout:
                    # transformers 5 fuses a MoE's experts into one parameter each; peft adapts such a
                    # parameter (lora.ParamWrapper) without dropout
                    raise ConfigError(
                        [
                            f"method.dropout={method.dropout}: peft applies no dropout to {type(model).__name__}'s "
                            f"fused MoE expert weights, which the LoRA targets include "
                            f"({_targets_setting(method, model_cfg)}); set method.dropout=0"
                        ]
                    ) from exc
                raise ConfigError([f"{_targets_setting(method, model_cfg)}: {exc}"]) from exc


def _refuse_targets_that_match_nothing(method: LoraMethod, adapted: Any) -> None:
    """Each name the user listed in ``method.target_modules`` must adapt something: peft refuses a
    list none of whose names match, but adapts the others of a list with one misspelt name
    (``[q_proj, v_prj]``: only q_proj trained, to exit 0). A model preset's
    ``model.lora_target_modules`` is not held to this (one list for a model family's variants)."""
    import torch

    targets = method.target_modules
    if not targets or [t.lower() for t in targets] == [ALL_LINEAR]:
        return
    tuner = adapted.base_model
    # (a parameter peft adapts directly, such as a MoE router's, is named down to its tensor: its module's name)
    parameters = [name.rsplit(".", 1)[0] for name in getattr(tuner, "targeted_parameter_names", [])]
    names = [*tuner.targeted_module_names, *parameters]
    unmatched = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if not unmatched:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D  # (GPT-2's projections)

    linear = sorted({name.rsplit(".", 1)[-1] for name, module in tuner.model.named_modules()
                     if isinstance(module, torch.nn.Linear | Conv1D | BaseTunerLayer) and "lora_" not in name
                     and not name.endswith(".base_layer")})  # fmt: skip
    model = type(tuner.model).__name__
    raise ConfigError(
        [
            f"method.target_modules={targets}: {', '.join(unmatched)} matches no module of {model} (peft would "
            f"adapt the others alone); its linear modules: {', '.join(linear)}"
        ]
    )
