"""One trainer per stage: the stock Trainer for ``sft`` and ``pretrain``, TRL's for ``dpo`` and ``kto``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sala_train.config.schema import DpoStage, KtoStage, PretrainStage, RunConfig, SftStage
from sala_train.data.build import TokenizedData


def build_trainer(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    data: TokenizedData,
    run_dir: Path,
    no_split_modules: list[str],
    callbacks: list[Any],
) -> Any:
    from transformers.trainer_callback import PrinterCallback

    match cfg.stage:
        case SftStage() | PretrainStage():
            from sala_train.stages import sft as stage_module
        case DpoStage() | KtoStage():
            from sala_train.stages import preference as stage_module  # type: ignore[no-redef]
        case _:
            raise AssertionError(cfg.stage)
    trainer = stage_module.build_trainer(cfg, model, tokenizer, data, run_dir, no_split_modules, callbacks)
    trainer.remove_callback(PrinterCallback)  # sala_train.progress prints progress instead of raw dicts
    return trainer
