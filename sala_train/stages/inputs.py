"""What every stage's trainer is built from: one object, so the stages share one signature."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sala_train.arguments import training_arguments
from sala_train.config.schema import RunConfig
from sala_train.data.build import TokenizedData
from sala_train.kernels import use_liger
from sala_train.tracking import MetricsFileCallback


@dataclass(frozen=True)
class TrainerInputs:
    cfg: RunConfig
    model: Any
    tokenizer: Any
    data: TokenizedData
    run_dir: Path
    no_split_modules: list[str]
    callbacks: list[Any]  # the runner's (preemption, publishing, ...); metrics.jsonl's comes first

    def arguments(self, args_class: type | None = None, stage_arguments: dict[str, Any] | None = None) -> Any:
        """TrainingArguments (or a TRL subclass with its ``stage_arguments``) for this run."""
        return training_arguments(self.cfg, self.run_dir, self.no_split_modules, args_class, stage_arguments,
                                  use_liger=use_liger(self.cfg.model, self.cfg.backend, self.model))  # fmt: skip

    def trainer_callbacks(self) -> list[Any]:
        return [MetricsFileCallback(self.run_dir), *self.callbacks]
