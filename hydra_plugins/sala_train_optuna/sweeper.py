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

from sala_train.launch.plan import PREEMPTED_EXIT

# What Optuna's storages raise for ``study.best_trial`` when no trial is complete.
_NO_COMPLETED_TRIAL = "No trials are completed yet"


class SalaTrainOptunaSweeper(OptunaSweeper):
    """``hparams_search`` presets' sweeper: Hydra's Optuna sweeper, without the all-failed
    traceback, and leaving no trial of a stored study running after a stop signal."""

    def sweep(self, arguments: list[str]) -> None:
        before = self._trials_stored()
        try:
            super().sweep(arguments)
        except SystemExit:
            # A stop signal ends the sweep from inside its job (sala_train.cli): Hydra's sweeper is
            # never told how that trial ended, and a stored study would keep it RUNNING for good.
            self._fail_running_trials(before)
            raise
        except ValueError as exc:
            if _NO_COMPLETED_TRIAL not in str(exc):
                raise
            from sala_train import sweep

            config: Any = self.sweeper.config
            sweep.summarize(config)
            if sweep.preempted_jobs and not sweep.failed_jobs:
                # Stopped, not failed: as a sweep of preempted jobs, 75 (a requeue wrapper's "again").
                print(f"sala-train: no trial of the Optuna search completed: each was stopped on request "
                      f"({config.hydra.sweep.dir}/optimization_results.yaml not written)", file=sys.stderr,
                      flush=True)  # fmt: skip
                sys.exit(PREEMPTED_EXIT)
            print(
                f"sala-train: no trial of the Optuna search completed, so there are no best parameters "
                f"({config.hydra.sweep.dir}/optimization_results.yaml not written)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)

    def _study(self) -> Any:
        """The stored study (None in memory, or not made yet)."""
        impl = self.sweeper
        if impl.storage is None:
            return None
        import optuna

        try:
            return optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:  # (Optuna's word for a study not in the storage yet)
            return None

    def _trials_stored(self) -> int:
        study = self._study()
        return 0 if study is None else len(study.trials)

    def _fail_running_trials(self, before: int) -> None:
        """This sweep's trials still RUNNING (those numbered from ``before``): FAIL."""
        import optuna

        study = self._study()
        for trial in study.trials[before:] if study is not None else []:
            if trial.state == optuna.trial.TrialState.RUNNING:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
