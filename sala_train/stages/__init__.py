"""One trainer per stage: the stock Trainer for ``sft`` and ``pretrain``, TRL's for ``dpo`` and ``kto``."""

from __future__ import annotations

from typing import Any

from sala_train.backends import keep_fsdp2_layer_wrapping
from sala_train.config.schema import DpoStage, KtoStage, PretrainStage, SftStage
from sala_train.stages.inputs import TrainerInputs


def build_trainer(inputs: TrainerInputs) -> Any:
    from transformers.trainer_callback import PrinterCallback

    match inputs.cfg.stage:
        case SftStage() | PretrainStage():
            from sala_train.stages import sft as stage_module
        case DpoStage() | KtoStage():
            from sala_train.stages import preference as stage_module  # type: ignore[no-redef]
        case _:
            raise AssertionError(inputs.cfg.stage)
    trainer = stage_module.build_trainer(inputs)
    keep_fsdp2_layer_wrapping(trainer)
    trainer.remove_callback(PrinterCallback)  # sala_train.progress prints progress instead of raw dicts
    return trainer
