"""Hydra's Optuna sweeper, ending a search in which no trial completed with one line.

Hydra's sweeper asks Optuna for the best trial after the last one; when every trial failed,
Optuna raises ``ValueError: No trials are completed yet`` and Hydra prints a traceback (exit 1).
Every trial's own failure has already been reported by then, so sala-train prints the sweep's
summary and says why there are no best parameters instead. The search itself is Hydra's.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

# What Optuna's storages raise for ``study.best_trial`` when no trial is complete.
_NO_COMPLETED_TRIAL = "No trials are completed yet"


class SalaTrainOptunaSweeper(OptunaSweeper):
    """``hparams_search`` presets' sweeper: Hydra's Optuna sweeper, without the all-failed traceback."""

    def sweep(self, arguments: list[str]) -> None:
        try:
            super().sweep(arguments)
        except ValueError as exc:
            if _NO_COMPLETED_TRIAL not in str(exc):
                raise
            from sala_train import sweep

            config: Any = self.sweeper.config
            sweep.summarize(config)
            print(
                f"sala-train: no trial of the Optuna search completed, so there are no best parameters "
                f"({config.hydra.sweep.dir}/optimization_results.yaml not written)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
