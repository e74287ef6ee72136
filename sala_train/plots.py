"""A run's ``loss.png``. Kept apart from the training code: ``sala-report`` draws it too, and
importing transformers (through the Trainer callback beside it) made that command take 5 s more."""

from __future__ import annotations

from pathlib import Path

from sala_train.metrics import eval_curve, read_metrics

PLOT_FILE = "loss.png"


def plot_losses(run_dir: Path) -> Path | None:
    """``loss.png`` of the run's train and eval losses; None, writing nothing, when none is logged
    yet (a dry run's directory, a run stopped before its first log)."""
    records = read_metrics(run_dir)
    if not any(r.get("event") in ("train", "eval") for r in records):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and "loss" in r]
    evals = eval_curve(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        # (a line of one point draws nothing: a run shorter than two logging intervals showed none)
        ax.plot(*zip(*train, strict=True), marker="." if len(train) < 2 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
