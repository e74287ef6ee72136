"""Supervised fine-tuning and continual pre-training with the stock ``transformers.Trainer``.

The loss mask lives in the labels (IGNORE_INDEX outside assistant turns), so the Trainer's own
causal-LM loss is the SFT loss; with gradient accumulation it normalises by the number of trained
tokens in the whole accumulated batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sala_train.arguments import training_arguments
from sala_train.config.schema import RunConfig
from sala_train.data.build import TokenizedData
from sala_train.data.collators import PadToLongestCollator
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

    return Trainer(
        model=model,
        args=training_arguments(cfg, run_dir, no_split_modules),
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=PadToLongestCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(run_dir), *callbacks],
    )
