"""Load a pretrained model already partitioned under ZeRO-3 (DeepSpeed's ``zero.Init``).

Without it every process of a node reads the whole model into CPU memory and DeepSpeed partitions
it only when the Trainer starts: 8 copies of MiniCPM-SALA's 19 GB on the guide's one node. The
guide's finetune.py (like every script that parses its TrainingArguments first) loads under
``zero.Init``: rank 0 reads the checkpoint and each process keeps only its partition.

transformers loads that way only while a TrainingArguments carrying a ZeRO-3 config is alive (its
``HfDeepSpeedConfig``, which transformers holds by a weak reference). The runner makes its
TrainingArguments with the Trainer, after the model, so ``partitioned_loading`` holds one from
loading until the Trainer exists; this module is only that bridge.

Left out, and loaded whole as before: a model built from scratch (under ``zero.Init``
transformers initialises it on rank 0 in its own order, so the same seed would give other weights
than on every other backend), and 16-bit weights trained without ``train.bf16``/``fp16``
(``zero.Init`` creates parameters in DeepSpeed's training dtype, float32 there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sala_train.config.schema import DType, RunConfig, Zero3Backend
from sala_train.errors import unloadable


def _weight_bytes(cfg: RunConfig) -> int:
    from sala_train.memory import weight_bytes

    config = None
    if cfg.model.dtype is DType.AUTO:  # (the checkpoint's: its config.json says)
        from transformers import AutoConfig

        from sala_train.models import hub_kwargs

        with contextlib.suppress(*unloadable()):  # (the model's load then says why)
            config = AutoConfig.from_pretrained(cfg.model.name_or_path, **hub_kwargs(cfg.model))
    return weight_bytes(cfg.model, config)


@contextlib.contextmanager
def partitioned_loading(cfg: RunConfig, run_dir: Path) -> Iterator[bool]:
    """While open, ``from_pretrained`` loads partitioned where ``loads_partitioned``; yields
    whether it does. Keep it open until the Trainer is built (peft, and a preference stage's
    reference model, read the same setting)."""
    from sala_train.memory import loads_partitioned

    if not isinstance(cfg.backend, Zero3Backend) or not loads_partitioned(cfg, _weight_bytes(cfg)):
        yield False
        return
    import deepspeed
    from transformers import TrainingArguments

    from sala_train.arguments import training_kwargs

    # (the same batch sizes and precision the Trainer's own arguments give DeepSpeed)
    arguments = TrainingArguments(**training_kwargs(cfg, run_dir))
    _ = arguments.device  # joins the process group, which zero.Init partitions over
    # On CUDA accelerate has started DeepSpeed's communication already; on its CPU accelerator it
    # has not, and zero.Init would read a world of one from DeepSpeed's config.
    deepspeed.init_distributed()
    try:
        yield True
    finally:
        del arguments


def held_by_zero3(param: Any) -> bool:
    """Whether ZeRO-3 holds this parameter (each process a partition of it, until gathered)."""
    return hasattr(param, "ds_id")


def is_partitioned(model: Any) -> bool:
    return any(held_by_zero3(param) for param in model.parameters())


def held_share(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters in the model), counting only what ZeRO-3 holds
    (none: transformers loaded the model whole, as it does a quantized checkpoint)."""
    partitioned = [param for param in model.parameters() if held_by_zero3(param)]
    return sum(param.ds_tensor.numel() for param in partitioned), sum(param.ds_numel for param in partitioned)


def in_training_dtype(model: Any, dtype: Any) -> None:
    """Cast what ZeRO-3 does not hold (LoRA's new weights) to the 16-bit training dtype. DeepSpeed
    casts a whole model it is given to that dtype, but skips the cast for one loaded under zero.Init:
    peft's float32 adapters then trained in float32, unlike on every other backend."""
    if dtype is None:  # (training in 32 bits: nothing to cast)
        return
    for param in model.parameters():
        if not held_by_zero3(param) and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
