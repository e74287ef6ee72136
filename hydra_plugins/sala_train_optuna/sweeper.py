"""Hydra's Optuna sweeper, ending a search in which no trial completed with one line.

Hydra's sweeper asks Optuna for the best trial after the last one; when every trial failed,
Optuna raises ``ValueError: No trials are completed yet`` and Hydra prints a traceback (exit 1).
Every trial's own failure has already been reported by then, so sala-train prints the sweep's
summary and says why there are no best parameters instead. The search itself is Hydra's, but for
``range()``, which it reads as ``-m`` does (``_ranges_read_as_in_a_sweep``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from sala_train.launch.plan import PREEMPTED_EXIT

# What Optuna's storages raise for ``study.best_trial`` when no trial is complete.
_NO_COMPLETED_TRIAL = "No trials are completed yet"


class SalaTrainOptunaSweeper(OptunaSweeper):
    """``hparams_search`` presets' sweeper: Hydra's Optuna sweeper, without the all-failed
    traceback, and leaving no trial of a stored study running after a stop signal."""

    def sweep(self, arguments: list[str]) -> None:
        self._refuse_to_replay_a_stored_study()
        asked: list[int] = []
        try:
            with _recording_asked_trials(asked), _ranges_read_as_in_a_sweep():
                super().sweep(arguments)
        except SystemExit:
            # A stop signal ends the sweep from inside its job (sala_train.cli): Hydra's sweeper is
            # never told how that trial ended, and a stored study would keep it RUNNING for good.
            self._fail_running_trials(asked)
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

    def _refuse_to_replay_a_stored_study(self) -> None:
        """The same search command again, with a storage: its seeded sampler drew the same trials
        again, their jobs (complete in the sweep directory) returned their old values, and the
        study counted each twice, feeding TPE duplicates. A stored study goes on in a new
        directory with another seed (as its stop message says); here it is refused, exit 2."""
        study = self._study()
        config: Any = self.sweeper.config
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        if study is None or not study.trials or not sweep_dir.is_dir():
            return
        from sala_train.report import sweep_jobs

        if not sweep_jobs(sweep_dir):
            return
        print(f"sala-train: hydra.sweeper.storage={self.sweeper.storage}: its study {self.sweeper.study_name} holds "
              f"{len(study.trials)} trials, and {sweep_dir} the jobs of a search of it: the same command again would "
              "draw the same trials (the same sampler seed) and count their jobs twice; continue the study with a "
              "new hydra.sweep.dir and another hydra.sweeper.sampler.seed", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(2)

    def _fail_running_trials(self, asked: list[int]) -> None:
        """The trials this sweep asked for that are still RUNNING: FAIL. (Only its own: other
        workers of a shared study run theirs meanwhile.)"""
        import optuna

        study = self._study()
        for trial in study.trials if study is not None else []:
            if trial.number in asked and trial.state == optuna.trial.TrialState.RUNNING:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


@contextmanager
def _recording_asked_trials(asked: list[int]) -> Iterator[None]:
    """Record the numbers of the trials this process asks Optuna for. Hydra's sweeper keeps them
    to itself (and a stored study's trials are shared with other workers), so ``Study.ask`` is
    wrapped while the sweep runs; the wrapper only records."""
    import optuna

    original = optuna.study.Study.ask

    def ask(study: Any, *args: Any, **kwargs: Any) -> Any:
        trial = original(study, *args, **kwargs)
        asked.append(trial.number)
        return trial

    optuna.study.Study.ask = ask  # type: ignore[method-assign]
    try:
        yield
    finally:
        optuna.study.Study.ask = original  # type: ignore[method-assign]


@contextmanager
def _ranges_read_as_in_a_sweep() -> Iterator[None]:
    """``range(a,b,step)`` as Hydra reads it everywhere else, ``b`` left out: Hydra's Optuna
    sweeper makes it a distribution whose high end is ``b``, which Optuna draws too
    (``method.dropout=range(0.5,1.0,0.5)`` drew 1.0, which the key refuses; ``train.seed=range(1,3)``
    ran seed 3), while the values the command line was checked with, and a ``-m`` sweep's, end
    before ``b``. The sweeper has no hook for it, so its function is wrapped while the sweep runs."""
    from hydra.core.override_parser.types import RangeSweep, Transformer
    from hydra_plugins.hydra_optuna_sweeper import _impl
    from optuna.distributions import DiscreteUniformDistribution, IntUniformDistribution

    original = _impl.create_optuna_distribution_from_override

    def distribution(override: Any) -> Any:
        sweep = override.value() if override.is_sweep_override() else None
        if not isinstance(sweep, RangeSweep) or sweep.shuffle:
            return original(override)
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if not values:  # (the command line's check refuses a range of no value)
            return original(override)
        if all(isinstance(end, int) for end in (sweep.start, sweep.stop, sweep.step)):
            return IntUniformDistribution(int(values[0]), int(values[-1]), step=int(sweep.step))
        return DiscreteUniformDistribution(float(values[0]), float(values[-1]), float(sweep.step))

    _impl.create_optuna_distribution_from_override = distribution
    try:
        yield
    finally:
        _impl.create_optuna_distribution_from_override = original
