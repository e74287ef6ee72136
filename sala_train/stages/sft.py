"""Supervised fine-tuning and continual pre-training with the stock ``transformers.Trainer``.

The loss mask lives in the labels (IGNORE_INDEX outside assistant turns), so the Trainer's own
causal-LM loss is the SFT loss; with gradient accumulation it normalises by the number of trained
tokens in the whole accumulated batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sala_train.arguments import training_arguments
from sala_train.config.schema import AttnImplementation, RunConfig
from sala_train.data.batching import GroupCollator, GroupedDataset, budget_groups
from sala_train.data.build import TokenizedData
from sala_train.data.collators import PadToLongestCollator
from sala_train.kernels import use_liger
from sala_train.packing import PackedCollator
from sala_train.tracking import MetricsFileCallback


def build_trainer(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    data: TokenizedData,
    run_dir: Path,
    no_split_modules: list[str],
    callbacks: list[Any],
) -> Any:
    from transformers import Trainer

    collator = batch_collator(cfg, tokenizer)
    train = data.splits["train"]
    if cfg.train.max_tokens_per_batch is not None:
        lengths = [len(ids) for ids in train["input_ids"]]
        groups = budget_groups(lengths, cfg.train.max_tokens_per_batch, cfg.train.packing, cfg.train.seed)
        train, collator = GroupedDataset(train, groups), GroupCollator(collator)
    return Trainer(
        model=model,
        args=training_arguments(cfg, run_dir, no_split_modules, use_liger=use_liger(cfg.model, model)),
        train_dataset=train,
        eval_dataset=data.splits["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(run_dir), *callbacks],
    )


def batch_collator(cfg: RunConfig, tokenizer: Any) -> Any:
    """Packed rows (``train.packing``) or rows padded to the batch's longest sample."""
    if cfg.train.packing:
        if cfg.model.attn_implementation == AttnImplementation.SALA_VARLEN:
            return PackedCollator(tokenizer.pad_token_id, row_tokens=None, varlen_kwargs=True)
        return PackedCollator(tokenizer.pad_token_id, row_tokens=cfg.dataset.cutoff_len)
    return PadToLongestCollator(pad_token_id=tokenizer.pad_token_id)
