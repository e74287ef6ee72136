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


def on_the_save_grid(args: Any, state: Any, step: int | None = None) -> bool:
    """Whether an evaluation at ``step`` (by default this one) is at a checkpoint every run of this
    config saves (every ``save_steps``, and the last step), not only this one: a checkpoint a stop
    request saved off the grid is not one an uninterrupted run has, so it must not change which
    checkpoint is best. Evaluated by epoch, the Trainer evaluates at epoch ends only, where it saves
    too (``train.load_best_model_at_end`` needs both by epoch, and whole epochs)."""
    step = state.global_step if step is None else step
    if getattr(args.save_strategy, "value", args.save_strategy) == "epoch":
        return True
    return step >= state.max_steps or (state.save_steps > 0 and step % state.save_steps == 0)


class BestAmongCheckpoints:
    """A Trainer mix-in: only the evaluation at a step of the save grid can set the best."""

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        if not on_the_save_grid(self.args, self.state):  # type: ignore[attr-defined]
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
    whose checkpoints are not in this run's directory: this run's best is among its own.

    ``patience``: stop once that many checkpoint evaluations in a row (on the save grid) have not
    bettered the best. Counted from the log history, which every checkpoint keeps, so a resumed run
    counts on where it stopped, and one resumed from where it stopped early trains no further.
    (Not transformers' ``EarlyStoppingCallback``: it needs the Trainer's own ``load_best_model_at_end``,
    which sala-train does not use (``load_best``), and counts evaluations between checkpoints too.)
    """

    def __init__(self, run_dir: Path, from_another_run: bool, tracked: bool, patience: int | None = None,
                 metric: str = "loss"):  # fmt: skip
        self.run_dir, self.from_another_run, self.tracked = run_dir, from_another_run, tracked
        self.patience, self.metric = patience, f"eval_{metric_name(metric)}"
        self.stopped_early: str | None = None  # what to say, once training stopped early

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.from_another_run:
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        elif self.tracked and state.global_step > 0:
            self._best_of_those_kept(args, state, greater_is_better(self.metric))
        if self.patience is not None and self._not_bettered(args, state) >= self.patience:
            raise StoppedEarlyAlready

    def _best_of_those_kept(self, args: Any, state: Any, greater: bool) -> None:
        """The best as the checkpoints still in the run give it, from the log history: a resumed
        checkpoint records the best as it stood then, which pruning may have removed since (a run
        resumed from one of its earlier checkpoints), set aside as damaged, or which another
        ``train.metric_for_best_model`` scored."""
        from sala_train.checkpoints import is_complete

        scores: dict[int, float] = {}
        for entry in state.log_history:
            step = entry.get("step")
            if not (self.metric in entry and isinstance(step, int) and 0 < step <= state.global_step):
                continue
            if (
                on_the_save_grid(args, state, step)
                and math.isfinite(entry[self.metric])
                and is_complete(self.run_dir / f"checkpoint-{step}")
            ):
                scores[step] = float(entry[self.metric])
        recorded = state.best_global_step
        pick = max if greater else min  # (the earliest of equal scores, as the Trainer keeps the first)
        best = pick(sorted(scores), key=scores.__getitem__) if scores else None
        state.best_global_step, state.best_metric = best, scores.get(best) if best is not None else None
        state.best_model_checkpoint = str(self.run_dir / f"checkpoint-{best}") if best is not None else None
        if recorded is not None and recorded != best and state.is_world_process_zero:
            kept = f"checkpoint-{best} ({self.metric} {scores[best]:.4f})" if best is not None else "none"
            say(f"sala-train: the best checkpoint the resumed state records, checkpoint-{recorded}, is no longer in "
                f"the run (pruned, or set aside); the best of those kept: {kept}")  # fmt: skip

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.patience is None or not on_the_save_grid(args, state) or state.global_step >= state.max_steps:
            return
        if not any(entry.get("step") == state.global_step and self.metric in entry for entry in state.log_history):
            return
        if (count := self._not_bettered(args, state)) >= self.patience:
            control.should_training_stop = True
            self.stopped_early = (
                f"stopped early at step {state.global_step} of {state.max_steps}: {self.metric} has not bettered "
                f"checkpoint-{state.best_global_step}'s ({state.best_metric:.4f}) in the {count} checkpoints since "
                f"(train.early_stopping_patience={self.patience})"
            )

    def _not_bettered(self, args: Any, state: Any) -> int:
        """Checkpoint evaluations since the best one."""
        if state.best_global_step is None:
            return 0
        steps = {entry["step"] for entry in state.log_history
                 if self.metric in entry and entry.get("step", 0) > state.best_global_step
                 and on_the_save_grid(args, state, entry["step"])}  # fmt: skip
        return len(steps)


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
        raise DataError(
            f"train.load_best_model_at_end: the best checkpoint, {best} ({name} {state.best_metric:.4f}), is "
            "gone or incomplete (removed or set aside since it was saved); final/ not saved. Put it back and "
            "rerun the command, or save the last step's weights as final/ instead: rerun it with "
            f"train.load_best_model_at_end=false train.resume={newest}"
        )
    state.best_model_checkpoint = str(best)
    trainer._load_best_model()  # (the Trainer's loader: DeepSpeed, FSDP, an adapter or whole weights)
    last = _last_figure(state.log_history, name, state.global_step)
    than = f"; the last step's, {state.global_step}, was {last:.4f}" if last is not None else ""
    return f"final/ holds the weights of {best.name}, the best {name} ({state.best_metric:.4f}{than})"


def _last_figure(history: list[dict[str, Any]], name: str, step: int) -> float | None:
    values = [entry[name] for entry in history if entry.get("step") == step and name in entry]
    return float(values[-1]) if values else None
