"""Per-rank entry point: ``python -m sala_train.runner RUN_DIR``.

Reads only ``RUN_DIR/config.yaml`` (no Hydra here: ranks never re-compose) and runs the recipe
top to bottom: tokenizer, data, model, method, trainer, train, evaluate, save ``final/``.
Exit codes: 0 success, 2 config/data problem (one message), anything else a training failure.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sala_train.config import io
from sala_train.config.schema import RunConfig
from sala_train.errors import exit_on_user_error

FINAL_DIR = "final"


def resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    from sala_train.checkpoints import complete_checkpoints

    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    return Path(cfg.train.resume)


def train(run_dir: Path) -> None:
    cfg = io.load(RunConfig, run_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.WARNING)

    from transformers import set_seed

    from sala_train.checkpoints import checkpoint_step
    from sala_train.data.sft import build_sft_data
    from sala_train.methods import apply_method
    from sala_train.metrics import truncate_metrics_after
    from sala_train.models import check_attention_available, load_model, load_tokenizer
    from sala_train.stages.sft import build_trainer
    from sala_train.tracking import plot_losses

    set_seed(cfg.train.seed)
    check_attention_available(cfg.model)  # fail fast, before any download or tokenization
    tokenizer = load_tokenizer(cfg.model)
    data = build_sft_data(cfg.dataset, tokenizer)  # data problems surface before the model loads
    model = load_model(cfg.model, seed=cfg.train.seed)
    model.config.use_cache = False  # no KV cache while training
    model = apply_method(cfg.method, model, cfg.model, cfg.train.gradient_checkpointing)
    trainer = build_trainer(cfg, model, tokenizer, data, run_dir)

    checkpoint = resume_checkpoint(cfg, run_dir)
    if checkpoint is not None:
        print(f"sala-train: resuming from {checkpoint}", flush=True)
        trainer.args.eval_on_start = False  # the starting point was evaluated in the first run
    # Events past the checkpoint (or all of them, when starting over) are logged again.
    truncate_metrics_after(run_dir, checkpoint_step(checkpoint) if checkpoint else -1)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step % cfg.train.eval_steps != 0:
        trainer.evaluate()  # always end with an eval of the final weights
    trainer.save_model(str(run_dir / FINAL_DIR))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir / FINAL_DIR))
        plot_losses(run_dir)
        print(f"sala-train: saved {run_dir / FINAL_DIR}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sala_train.runner", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run directory holding config.yaml")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        train(args.run_dir.resolve())


if __name__ == "__main__":
    main()
