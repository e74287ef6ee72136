"""Full fine-tuning or LoRA: the one place that dispatches on ``method``."""

from __future__ import annotations

import warnings
from typing import Any

from sala_train.config.schema import FullMethod, LoraInit, LoraMethod, MethodConfig, ModelConfig
from sala_train.config.typed import ConfigError

ALL_LINEAR = "all-linear"  # peft: every linear layer except the output head
TIED_ADAPTER_WARNING = r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"


LLAMA_FACTORY_ALL = "all"  # LLaMA-Factory's lora_target for every linear layer but the head
REGEX_CHARACTERS = frozenset("*+?|()[]{}^$\\")


def lora_alpha(method: LoraMethod) -> int:
    """``method.alpha``, or twice the rank when it is null (LLaMA-Factory's default)."""
    return method.alpha if method.alpha is not None else 2 * method.r


def lora_targets(method: LoraMethod, model_cfg: ModelConfig) -> list[str] | str:
    """The LoRA targets: a list of module names, peft's ``all-linear``, or one regex. The config
    reads ``method.target_modules=all-linear`` (LLaMA-Factory's ``all`` too), or a regex, as a
    list of one, which peft would look for as a module name: such a list means what it says."""
    targets = method.target_modules or model_cfg.lora_target_modules or ALL_LINEAR
    if isinstance(targets, list) and [t.lower() for t in targets] in ([ALL_LINEAR], [LLAMA_FACTORY_ALL]):
        return ALL_LINEAR
    if isinstance(targets, list) and len(targets) == 1 and REGEX_CHARACTERS & set(targets[0]):
        return targets[0]
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
    if isinstance(targets, list) and {ALL_LINEAR, LLAMA_FACTORY_ALL} & {t.lower() for t in targets}:
        raise ConfigError(
            [
                f"{_targets_key(method, model_cfg)}={targets}: all-linear (every linear layer but the output head) "
                f"stands alone; set {_targets_key(method, model_cfg)}=all-linear, or list the modules without it"
            ]
        )
    both = sorted(set(targets) & set(method.modules_to_save or [])) if isinstance(targets, list) else []
    if both:
        raise ConfigError([_adapted_and_whole(method, model_cfg, both)])
    if isinstance(targets, list) and len(targets) > 1 and any(REGEX_CHARACTERS & set(t) for t in targets):
        regex = next(t for t in targets if REGEX_CHARACTERS & set(t))
        raise ConfigError(
            [
                f"{_targets_key(method, model_cfg)}={targets}: {regex!r} is a regex, which peft takes alone, over "
                f"whole module names; give one regex (e.g. '.*\\.(q_proj|v_proj)'), or names without regex characters"
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
            tied = _saved_whole_and_tied(method, model)
            config = LoraConfig(
                r=method.r,
                lora_alpha=lora_alpha(method),
                lora_dropout=method.dropout,
                target_modules=targets,
                init_lora_weights=True if method.init is LoraInit.DEFAULT else method.init.value,
                use_rslora=method.use_rslora,
                use_dora=method.use_dora,
                modules_to_save=list(method.modules_to_save or []) or None,  # (a copy: peft adds names to it)
                # A trained copy of a head tied to the input embeddings (or of those) stays tied to the
                # other's copy, as the model it came from: untied, the head would train apart from them.
                # (Only then: it also ties a LoRA target on the head to the embeddings.)
                ensure_weight_tying=bool(tied),
                # (adapter_config.json records the hub commit of the base: AutoPeftModelForCausalLM
                # loaded main's code and weights for final/, without a word, once main had moved)
                revision=model_cfg.revision,
                task_type="CAUSAL_LM",
            )
            try:
                with warnings.catch_warnings():
                    # peft warns that an adapter on a head tied to the input embeddings complicates a
                    # merge: sala-export unties the head before it merges (export._untie_adapted_head),
                    # and adapters are saved as safetensors, so the warning asks nothing of the user.
                    warnings.filterwarnings("ignore", message=TIED_ADAPTER_WARNING, category=UserWarning)
                    adapted = get_peft_model(model, config)
                _refuse_targets_that_match_nothing(method, model_cfg, adapted)
                _refuse_modules_to_save_peft_widened(method, adapted, tied)
                _refuse_modules_to_save_that_match_nothing(method, adapted)
                if method.use_dora:
                    _refuse_dora_on_zero_rows(adapted)
                return adapted
            except TypeError as exc:
                if "modules_to_save cannot be applied" not in str(exc):
                    raise
                # (a module of modules_to_save that the targets adapt too, found only on the model:
                # all-linear or a regex matched it; or the tied partner of one, which peft wraps with it)
                if tied:
                    raise ConfigError([_tied_partner_adapted(method, model_cfg, *tied)]) from exc
                raise ConfigError([_adapted_and_whole(method, model_cfg, method.modules_to_save or [])]) from exc
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
                raise ConfigError([f"{_targets_setting(method, model_cfg)}: {_unsupported_target(exc)}"]) from exc


def _named_by(module: str, names: list[str]) -> bool:
    """Whether one of ``names`` names ``module``: its whole dotted path, or the path's last parts."""
    return any(module == name or module.endswith(f".{name}") for name in names)


def _refuse_targets_that_match_nothing(method: LoraMethod, model_cfg: ModelConfig, adapted: Any) -> None:
    """Each name the user listed in ``method.target_modules`` must adapt something: peft refuses a
    list none of whose names match, but adapts the others of a list with one misspelt name
    (``[q_proj, v_prj]``: only q_proj trained, to exit 0). A model preset's
    ``model.lora_target_modules`` is not held to this (one list for a model family's variants)."""
    import torch

    targets = method.target_modules
    if not targets or not isinstance(lora_targets(method, model_cfg), list):
        return  # (all-linear, or a regex, which peft refuses when it matches nothing)
    tuner = adapted.base_model
    # (a parameter peft adapts directly, such as a MoE router's, is named down to its tensor: its module's name)
    parameters = [name.rsplit(".", 1)[0] for name in getattr(tuner, "targeted_parameter_names", [])]
    names = [*tuner.targeted_module_names, *parameters]
    unmatched = [t for t in targets if not any(_named_by(name, [t]) for name in names)]
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


def _saved_whole_and_tied(method: LoraMethod, model: Any) -> tuple[str, str] | None:
    """(the ``modules_to_save`` name, its partner's name) where it names the input embeddings or the
    output head of a model that ties the two; None otherwise."""
    if not method.modules_to_save or not getattr(model.config, "tie_word_embeddings", False):
        return None
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    pairs = (
        (names.get(id(embeddings), ""), names.get(id(head), "")),
        (names.get(id(head), ""), names.get(id(embeddings), "")),
    )
    for saved in method.modules_to_save:
        for mine, partner in pairs:
            if mine and _named_by(mine, [saved]):
                return saved, partner.rsplit(".", 1)[-1]
    return None


def _tied_partner_adapted(method: LoraMethod, model_cfg: ModelConfig, saved: str, partner: str) -> str:
    return (f"method.modules_to_save={method.modules_to_save}: this model ties {saved} to {partner}, which LoRA "
            f"adapts ({_targets_setting(method, model_cfg)}); trained whole, {saved} takes {partner} with it: "
            f"take {partner} out of the LoRA targets")  # fmt: skip


def _adapted_and_whole(method: LoraMethod, model_cfg: ModelConfig, modules: list[str]) -> str:
    """The refusal of modules both adapted by LoRA and trained whole (peft's TypeError, a traceback)."""
    return (f"method.modules_to_save={method.modules_to_save}: {', '.join(modules)} is also adapted by LoRA "
            f"({_targets_setting(method, model_cfg)}); a module is either adapted or trained whole: leave it out "
            "of one of them")  # fmt: skip


def _refuse_modules_to_save_peft_widened(method: LoraMethod, adapted: Any, tied: tuple[str, str] | None) -> None:
    """peft takes a ``modules_to_save`` name as the end of a module's name, dot or not: ``[norm]``
    trained every ``input_layernorm`` and ``post_attention_layernorm`` whole beside ``model.norm``
    (Qwen3's ``q_norm`` too), and saved them, without a word. sala-train reads a name as a module's
    own name or its path's end (as peft reads ``target_modules``), and refuses what peft adds."""
    if not method.modules_to_save:
        return
    from peft.utils import ModulesToSaveWrapper

    wrapped = [n for n, m in adapted.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    asked = list(method.modules_to_save)
    extra = [n for n in wrapped if not _named_by(n, asked + ([tied[1]] if tied else []))]
    if not extra:
        return
    meant: list[str] = []
    for entry in asked:  # its modules by full path; for a name no module has (layernorm), theirs that it ends
        meant += [n for n in wrapped if _named_by(n, [entry])] or sorted(
            {n.rsplit(".", 1)[-1] for n in wrapped if n.endswith(entry)}
        )
    more = f", and {len(extra) - 3} more" if len(extra) > 3 else ""
    raise ConfigError(
        [
            f"method.modules_to_save={asked}: peft takes each name as the end of a module's name, so it would "
            f"{'also ' if len(extra) < len(wrapped) else ''}train whole {', '.join(extra[:3])}{more}; name each "
            f"module by its own name or full path, such as method.modules_to_save=[{','.join(meant)}]"
        ]
    )


def _refuse_dora_on_zero_rows(adapted: Any) -> None:
    """DoRA scales each output row of an adapted weight by a learned magnitude over the row's norm:
    a row that is all zeros (an embedding's padding row, under a head tied to the embeddings; rows
    of a pretrained model's projections, huggingface/peft#2049) gives 0/0, and every loss is NaN
    from the first step (the divergence message then blamed the learning rate)."""
    import contextlib

    zero_rows: dict[str, int] = {}
    for name, parameter in adapted.named_parameters():
        if "lora_magnitude_vector" not in name:
            continue
        if parameter.is_meta:  # (a dry run's estimate builds the model without values)
            continue
        gathered: Any = contextlib.nullcontext()
        if hasattr(parameter, "ds_id"):  # (partitioned by ZeRO-3)
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([parameter])
        with gathered:
            count = int((parameter == 0).sum())
        if count:
            module = name.removeprefix("base_model.model.").split(".lora_magnitude_vector", 1)[0]
            zero_rows[module] = count
    if zero_rows:
        where = ", ".join(f"{module} ({count} row{'s' if count > 1 else ''})"
                          for module, count in list(zero_rows.items())[:3])  # fmt: skip
        more = f", and {len(zero_rows) - 3} more modules" if len(zero_rows) > 3 else ""
        short = sorted({module.rsplit(".", 1)[-1] for module in zero_rows})
        raise ConfigError(
            [
                f"method.use_dora=true: adapted weights have output rows that are all zero, which DoRA divides by "
                f"their norm (0/0: every loss would be NaN): {where}{more}; leave {', '.join(short)} out of the "
                "LoRA targets, or set method.use_dora=false"
            ]
        )


def _refuse_modules_to_save_that_match_nothing(method: LoraMethod, adapted: Any) -> None:
    """peft trains none of a ``modules_to_save`` name that matches no module, without a word."""
    if not method.modules_to_save:
        return
    import re

    peft_own = re.compile(r"(^|\.)(lora_\w+|base_layer|modules_to_save|original_module)(\.|$)")
    names = [name for name, _ in adapted.base_model.model.named_modules() if not peft_own.search(name)]
    unmatched = [m for m in method.modules_to_save if not any(_named_by(n, [m]) for n in names)]
    if unmatched:
        top = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(
            [
                f"method.modules_to_save={method.modules_to_save}: {', '.join(unmatched)} matches no module of "
                f"{type(adapted.base_model.model).__name__}; its modules: {', '.join(top)}"
            ]
        )


def _unsupported_target(exc: ValueError) -> str:
    """peft's refusal of a target that is no layer LoRA adapts (``self_attn``) prints the module's
    whole structure, a whole decoder for ``layers``: said in one line instead."""
    message = str(exc)
    if "is not supported" not in message or "Target module" not in message:
        return message
    import re

    found = re.search(r"Target module (\w+)\(", message)
    kind = found.group(1) if found else "module"
    return (f"a target is a {kind}, which holds layers rather than being one; LoRA adapts Linear, Embedding "
            "and Conv layers: name those (e.g. q_proj, v_proj), not the block that holds them")  # fmt: skip
