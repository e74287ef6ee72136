"""The ONE mapping from our small schemas onto ``transformers.TrainingArguments``.

OmegaConf cannot hold TrainingArguments (its Union fields), and most of its ~150 fields are not
ours to expose, so the config keeps a small schema and this function fills in the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sala_train.config.best_metric import greater_is_better, metric_name
from sala_train.config.schema import RunConfig


def training_arguments(
    cfg: RunConfig,
    run_dir: Path,
    no_split_modules: list[str] | None = None,
    args_class: type | None = None,
    stage_arguments: dict[str, Any] | None = None,
    use_liger: bool = False,
) -> Any:
    """``args_class``: a TrainingArguments subclass (TRL's DPOConfig, KTOConfig) filled the same way,
    plus its own ``stage_arguments``."""
    from transformers import TrainingArguments

    kwargs = training_kwargs(cfg, run_dir, no_split_modules, stage_arguments, use_liger)
    return (args_class or TrainingArguments)(**kwargs)


def training_kwargs(
    cfg: RunConfig,
    run_dir: Path,
    no_split_modules: list[str] | None = None,
    stage_arguments: dict[str, Any] | None = None,
    use_liger: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of ``training_arguments`` (built apart: TrainingArguments sets up the
    device as it is made, so what a CUDA machine gets is checked here without one)."""
    from sala_train.backends import backend_arguments

    t = cfg.train
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type.value,
        # transformers 5 reads a float in [0, 1) as a share of the total steps (it dropped warmup_ratio).
        warmup_steps=t.warmup_ratio if t.warmup_ratio is not None else t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # A NaN or inf step loss is logged as it is (the Trainer's default replaced it, so a diverged
        # run showed "loss 0.0000" and the divergence check never saw its train loss).
        logging_nan_inf_filter=False,
        eval_strategy=t.eval_strategy.value,
        eval_steps=t.eval_steps,
        eval_on_start=t.eval_on_start,
        save_strategy=t.save_strategy.value,
        save_steps=t.save_steps,
        save_total_limit=None,  # sala_train.publisher prunes, only after a new checkpoint is complete
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.dataloader_num_workers,
        **batch_transfer(t.dataloader_pin_memory),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # our collator needs input_ids/labels only; keep them
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,  # sala_train.progress draws the bar (or plain lines off a terminal)
        log_level="warning",
        save_on_each_node=False,
    )
    kwargs[CHECKPOINTING_ARGUMENT] = t.gradient_checkpointing
    if t.load_best_model_at_end:
        # The Trainer tracks the best checkpoint; sala_train.best_checkpoint loads it (so not
        # the Trainer's load_best_model_at_end, which ends only a run that trained).
        metric = metric_name(t.metric_for_best_model)
        kwargs |= {"metric_for_best_model": metric, "greater_is_better": greater_is_better(metric)}
    if t.min_lr_rate is not None:
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": t.min_lr_rate}
    if t.max_tokens_per_batch is not None:
        kwargs["per_device_train_batch_size"] = 1  # one token-budget group per batch
    if t.group_by_length:
        kwargs |= _group_by_length()
    kwargs["use_liger_kernel"] = use_liger
    kwargs |= backend_arguments(cfg.backend, no_split_modules or [], t.gradient_checkpointing)
    kwargs |= stage_arguments or {}
    return kwargs


def batch_transfer(pin_memory: bool) -> dict[str, Any]:
    """How batches reach the GPU: pinned (``train.dataloader_pin_memory``, on CUDA only) and then
    copied without waiting. accelerate's copy blocks by default, so the CPU waited for the GPU's
    queue to drain at every micro-batch before it could collate the next."""
    pin = pin_memory and torch.cuda.is_available()
    return {"dataloader_pin_memory": pin, "accelerator_config": {"non_blocking": pin}}


def _group_by_length() -> dict[str, Any]:
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}  # transformers before the sampling-strategy field


def _checkpointing_argument() -> str:
    """transformers 5.x renamed ``gradient_checkpointing`` (the old name warns on every run)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


CHECKPOINTING_ARGUMENT = _checkpointing_argument()


def mixed_precision_dtype(cfg: RunConfig) -> torch.dtype | None:
    """The 16-bit dtype the Trainer trains in (``train.bf16`` / ``train.fp16``); None in 32 bits."""
    return torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None
