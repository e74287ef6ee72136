"""``train.load_best_model_at_end``: ``final/`` from the checkpoint with the best eval figure.

The Trainer tracks the best figure at every evaluation, including those at steps it saves no
checkpoint for: with ``save_steps`` a multiple of ``eval_steps``, an eval between two saves could
become the best, and the best *checkpoint* then stayed the one before it even when a later
checkpoint scored better than that one. Here only an evaluation at a step that saves a checkpoint
competes (``BestAmongCheckpoints``), so the best step always names a checkpoint.

The Trainer's own ending (its ``load_best_model_at_end``) is not used: it runs inside ``train()``
only, so a rerun with nothing left to train (resumed at the last step) saved the last weights,
and a best checkpoint that was gone was a logged warning, the last weights saved as the best.
``load_best`` loads it after training, whichever way training ended, and stops when it is gone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sala_train.config.best_metric import greater_is_better, metric_name
from sala_train.console import say
from sala_train.errors import DataError


def on_the_save_grid(args: Any, state: Any, step: int, epoch: float | None) -> bool:
    """Whether an evaluation at ``step`` (``epoch``: its epoch count, as the Trainer logs it) is at
    a checkpoint every run of this config saves: every ``save_steps``, or at each epoch's end when
    saving by epoch, and the last step. A checkpoint a stop request saved off that grid (and the
    evaluation the Trainer adds at the end of an epoch a stop request cut short) is not one an
    uninterrupted run has, so it must not change which checkpoint is best."""
    if step >= state.max_steps:
        return True
    if getattr(args.save_strategy, "value", args.save_strategy) == "epoch":
        return epoch is not None and abs(epoch - round(epoch)) < 1e-6
    return state.save_steps > 0 and step % state.save_steps == 0


class BestAmongCheckpoints:
    """A Trainer mix-in: only the evaluation at a step of the save grid can set the best."""

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        if not on_the_save_grid(self.args, self.state, self.state.global_step, self.state.epoch):  # type: ignore[attr-defined]
            return False
        try:
            return bool(super()._determine_best_metric(metrics, trial))  # type: ignore[misc]
        except KeyError as exc:  # (the Trainer's: a figure this evaluation did not report)
            metric = self.args.metric_for_best_model  # type: ignore[attr-defined]
            reported = ", ".join(sorted(k.removeprefix("eval_") for k in metrics if k.startswith("eval_")))
            raise DataError(
                f"train.metric_for_best_model={metric}: the evaluation at step {self.state.global_step} did not "  # type: ignore[attr-defined]
                f"report it (it reported {reported})"
            ) from exc


class StoppedEarlyAlready(Exception):
    """A resumed checkpoint is where ``train.early_stopping_patience`` stopped the run: nothing
    is left to train (the Trainer would go on to ``max_steps``)."""


class BestCheckpoint(TrainerCallback):  # type: ignore[misc]
    """This run's best checkpoint, and early stopping by it.

    Starting from another run's checkpoint (``train.resume=PATH``), the best so far is that run's,
    whose checkpoints are not in this run's directory: this run's best is among its own, and its
    evaluations are those after ``history_after`` (the step it started from; 0 for its own).

    ``patience``: stop once that many checkpoint evaluations in a row (on the save grid) have not
    bettered the best before them. Counted from the log history every checkpoint keeps, whichever
    checkpoints are still kept, so a resumed run stops where an uninterrupted one does, and one
    resumed where it stopped early trains no further. (Not transformers' ``EarlyStoppingCallback``:
    it needs the Trainer's own ``load_best_model_at_end``, which sala-train does not use
    (``load_best``), and counts evaluations between checkpoints too.)
    """

    def __init__(self, run_dir: Path, from_another_run: bool, tracked: bool, patience: int | None = None,
                 metric: str = "loss", history_after: int = 0):  # fmt: skip
        self.run_dir, self.from_another_run, self.tracked = run_dir, from_another_run, tracked
        self.patience, self.metric, self.history_after = patience, f"eval_{metric_name(metric)}", history_after
        self.greater = greater_is_better(self.metric)
        self.stopped_early: str | None = None  # what to say, once training stopped early
        self.stopped_already = False  # resumed where training stopped early: nothing left to train

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.from_another_run:
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        elif self.tracked and state.global_step > 0:
            self._best_of_those_kept(args, state)
        # (said by the last callback, once every other one has begun: sala_train.runner._train)
        self.stopped_already = (self.patience is not None and state.global_step < state.max_steps
                                and self._not_bettered(args, state)[0] >= self.patience)  # fmt: skip

    def _scores(self, args: Any, state: Any) -> dict[int, float]:
        """This run's checkpoint evaluations so far, by step (the last of a step's)."""
        scores: dict[int, float] = {}
        for entry in state.log_history:
            step = entry.get("step")
            if (
                self.metric in entry
                and isinstance(step, int)
                and self.history_after < step <= state.global_step
                and (on_the_save_grid(args, state, step, entry.get("epoch")))
            ):
                scores[step] = float(entry[self.metric])
        return scores

    def _better(self, value: float, than: float | None) -> bool:
        """As the Trainer compares: strictly, so the earliest of equal scores stays the best."""
        if not math.isfinite(value):
            return False
        return than is None or (value > than if self.greater else value < than)

    def _best_of_those_kept(self, args: Any, state: Any) -> None:
        """The best as the checkpoints still in the run give it: a resumed checkpoint records the
        best as it stood then, which pruning may have removed since (a run resumed from one of its
        earlier checkpoints), set aside as damaged, or which another ``train.metric_for_best_model``
        scored."""
        from sala_train.checkpoints import is_complete

        scores = self._scores(args, state)
        best, _ = self._running_best(scores, lambda step: is_complete(self.run_dir / f"checkpoint-{step}"))
        recorded = state.best_global_step
        state.best_global_step, state.best_metric = best, scores[best] if best is not None else None
        state.best_model_checkpoint = str(self.run_dir / f"checkpoint-{best}") if best is not None else None
        if recorded is None or recorded == best or not state.is_world_process_zero:
            return
        now = f"checkpoint-{best} ({self.metric} {scores[best]:.4f})" if best is not None else "none"
        if is_complete(self.run_dir / f"checkpoint-{recorded}"):
            say(f"sala-train: by train.metric_for_best_model={self.metric.removeprefix('eval_')} the best checkpoint "
                f"so far is {now}, not checkpoint-{recorded} as the resumed state records")  # fmt: skip
        else:
            say(f"sala-train: the best checkpoint the resumed state records, checkpoint-{recorded}, is no longer in "
                f"the run (pruned, or set aside); the best of those kept: {now}")  # fmt: skip

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.patience is None or state.global_step >= state.max_steps:
            return
        scores = self._scores(args, state)
        if state.global_step not in scores:  # (no checkpoint evaluation at this save)
            return
        count, best, value = self._not_bettered(args, state, scores)
        if count >= self.patience:
            control.should_training_stop = True
            self.stopped_early = (
                f"stopped early at step {state.global_step} of {state.max_steps}: {self.metric} has not bettered "
                f"checkpoint-{best}'s ({value:.4f}) in the {count} checkpoints since "
                f"(train.early_stopping_patience={self.patience})"
            )

    def _not_bettered(self, args: Any, state: Any, scores: dict[int, float] | None = None
                      ) -> tuple[int, int | None, float]:  # fmt: skip
        """(checkpoint evaluations since the best of them, its step, its score), from the history
        alone: whether a checkpoint is still kept does not change when the run stops."""
        scores = self._scores(args, state) if scores is None else scores
        best, since = self._running_best(scores)
        return since, best, scores[best] if best is not None else math.nan

    def _running_best(self, scores: dict[int, float], eligible: Any = None) -> tuple[int | None, int]:
        """(the best step of ``scores``, among the ``eligible`` ones, and how many came after it), as
        the Trainer compares: strictly, so the earliest of equal scores stays the best."""
        best: int | None = None
        since = 0
        for step, value in sorted(scores.items()):
            if (eligible is None or eligible(step)) and self._better(value, scores[best] if best is not None else None):
                best, since = step, 0
            else:
                since += 1
        return best, since


def from_another_run(checkpoint: Path | None, run_dir: Path) -> bool:
    return checkpoint is not None and checkpoint.resolve().parent != run_dir.resolve()


def load_best(trainer: Any, run_dir: Path, metric: str) -> str:
    """Load the best checkpoint's weights into the trained model (on every rank); returns what to
    say about it. A best checkpoint that is gone stops the run (``DataError``) before ``final/``."""
    from sala_train.checkpoints import is_complete

    state = trainer.state
    name = f"eval_{metric_name(metric)}"
    step = state.best_global_step
    if step is None:  # (no checkpoint of this run was evaluated: it started at its last step)
        return f"final/ holds the weights of step {state.global_step} (this run saved no checkpoint to compare)"
    if step == state.global_step:
        return f"final/ holds the last step's weights ({step}), the best {name} ({state.best_metric:.4f})"
    best = run_dir / f"checkpoint-{step}"
    if not is_complete(best):
        newest = f"{run_dir / f'checkpoint-{state.global_step}'}"
        stopping = " train.early_stopping_patience=null" if _stops_early(trainer) else ""
        raise DataError(
            f"train.load_best_model_at_end: the best checkpoint, {best} ({name} {state.best_metric:.4f}), is "
            "gone or incomplete (removed or set aside while the run trained); final/ not saved. Rerun the command "
            "to save the best of the checkpoints kept (put it back first to have it), or the last step's weights: "
            f"train.load_best_model_at_end=false{stopping} train.resume={newest}"
        )
    state.best_model_checkpoint = str(best)
    trainer._load_best_model()  # (the Trainer's loader: DeepSpeed, FSDP, an adapter or whole weights)
    last = _last_figure(state.log_history, name, state.global_step)
    than = f"; the last step's, {state.global_step}, was {last:.4f}" if last is not None else ""
    return f"final/ holds the weights of {best.name}, the best {name} ({state.best_metric:.4f}{than})"


def _stops_early(trainer: Any) -> bool:
    return any(isinstance(c, BestCheckpoint) and c.patience is not None for c in trainer.callback_handler.callbacks)


def _last_figure(history: list[dict[str, Any]], name: str, step: int) -> float | None:
    values = [entry[name] for entry in history if entry.get("step") == step and name in entry]
    return float(values[-1]) if values else None
