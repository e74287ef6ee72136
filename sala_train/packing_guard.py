"""The startup guard of ``train.packing``: packed and padded losses must agree on real batches
with the loaded model before packing may train (``packing.check_packing`` is the comparison).

Where it runs depends on how the model is held. Whole on each process (single, DDP, ZeRO-2,
FSDP), it runs before the Trainer is built, so a refusal costs no optimizer or engine. Under
ZeRO-3 it runs once DeepSpeed holds the model, at the start of training: DeepSpeed's hooks then
gather each layer's weights for its own forward and release them, as in a training step. Before
the engine exists the only way to compute with a ZeRO-3 model is to gather all of it on every
GPU, which a model that needs ZeRO-3 (one that does not fit one GPU) cannot do.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from sala_train.config.schema import DdpBackend, RunConfig, SingleBackend, Zero3Backend
from sala_train.console import say
from sala_train.ranks import is_main_process


def runs_once_deepspeed_holds_the_model(cfg: RunConfig) -> bool:
    return cfg.train.packing and isinstance(cfg.backend, Zero3Backend)


def guard_packing(cfg: RunConfig, model: Any, tokenizer: Any, data: Any) -> None:
    """The check on a model each process holds whole, before the Trainer exists."""
    import torch

    moved = torch.cuda.is_available()
    if moved:  # the varlen kernel runs on CUDA only; the Trainer moves it there anyway
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    _check(cfg, model, tokenizer, data)
    if moved and not isinstance(cfg.backend, SingleBackend | DdpBackend):
        model.to("cpu")  # DeepSpeed / FSDP place (and shard) the model themselves


def guard_callback(cfg: RunConfig, tokenizer: Any, data: Any) -> Any:
    """A Trainer callback that runs the check on every rank as training begins (after DeepSpeed's
    engine is built and a checkpoint resumed from is loaded, before any evaluation or step).
    Every rank computes the same batches, and a refusal is raised on all of them together: a rank
    that went on alone would wait in DeepSpeed's collectives for the others."""
    from transformers import TrainerCallback

    from sala_train.distributed import fail_together
    from sala_train.errors import DistributedSetupError

    class GuardPackingInTheEngine(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.checked = False

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.checked:
                return
            self.checked = True
            fail_together(lambda: _check(cfg, model, tokenizer, data), DistributedSetupError)

    return GuardPackingInTheEngine()


def _check(cfg: RunConfig, model: Any, tokenizer: Any, data: Any) -> None:
    from sala_train.data.collators import PadToLongestCollator
    from sala_train.packing import check_packing
    from sala_train.stages.sft import batch_collator

    padded = PadToLongestCollator(pad_token_id=tokenizer.pad_token_id)
    with _training_precision(cfg, model):
        check = check_packing(model, data.splits["train"], padded, batch_collator(cfg, tokenizer),
                              max(cfg.train.per_device_train_batch_size, 2))  # fmt: skip
    if not is_main_process():
        return
    if not check.leaks:  # (packed rows of one sample each cannot mix samples either)
        say("sala-train: packing check: fewer than two samples; nothing to compare")
        return
    shown = ", ".join(f"{padded_loss:.5f}/{packed_loss:.5f}" for padded_loss, packed_loss in check.losses)
    say(f"sala-train: packing check passed (no sample's logits move with the samples before it in its row; "
        f"padded/packed loss on real batches: {shown or 'no trained token left to compare'})")  # fmt: skip


def _training_precision(cfg: RunConfig, model: Any) -> Any:
    """The autocast the Trainer trains under (``train.bf16`` / ``train.fp16``), so the packing check
    computes as training does (sala_varlen needs 16 bits; float32 weights get them from autocast)."""
    import torch

    from sala_train.arguments import mixed_precision_dtype

    dtype = mixed_precision_dtype(cfg)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)
