"""Load a pretrained model already partitioned under ZeRO-3 (DeepSpeed's ``zero.Init``).

Without it every process of a node reads the whole model into CPU memory and DeepSpeed partitions
it only when the Trainer starts: 8 copies of MiniCPM-SALA's 19 GB on the guide's one node. The
guide's finetune.py (like every script that parses its TrainingArguments first) loads under
``zero.Init``: rank 0 reads the checkpoint and each process keeps only its partition.

transformers loads that way only while a TrainingArguments carrying a ZeRO-3 config is alive (its
``HfDeepSpeedConfig``, which transformers holds by a weak reference). The runner makes its
TrainingArguments with the Trainer, after the model, so ``partitioned_loading`` holds one from
loading until the Trainer exists; this module is only that bridge.

A model built from scratch is left out: under ``zero.Init`` transformers initialises it on rank 0
in its own order, so the same seed would give other weights than on every other backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sala_train.config.schema import RunConfig, Zero3Backend
from sala_train.errors import ModelLoadError


@contextlib.contextmanager
def partitioned_loading(cfg: RunConfig, run_dir: Path) -> Iterator[bool]:
    """While open, ``from_pretrained`` loads partitioned when ``cfg`` asks for ZeRO-3; yields
    whether it does. Keep it open until the Trainer is built (peft, and a preference stage's
    reference model, read the same setting)."""
    if not isinstance(cfg.backend, Zero3Backend) or cfg.model.from_scratch:
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


def loaded_on_every_rank(load: Callable[[], Any]) -> Any:
    """``load()`` on every process, and its problem on every process if any has one.

    Under zero.Init rank 0 alone reads the weights' values (the others take their names and shapes),
    so only it meets weights of other shapes than the config's, or a damaged file: the others would
    go on to train and end in a traceback when it stops. Every process raises the problem instead,
    and it is printed once."""
    import torch.distributed as dist

    model, problem = None, None
    try:
        model = load()
    except ModelLoadError as exc:
        problem = exc
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if problem is None else str(problem))
    if problem is not None:
        raise problem
    first = next((text for text in problems if text is not None), None)
    if first is not None:
        raise ModelLoadError(first)
    return model


def is_partitioned(model: Any) -> bool:
    """Whether ZeRO-3 holds this model's parameters (each process a partition, until gathered)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def gathered(model: Any) -> Any:
    """Every parameter whole on every process for the duration (a partitioned model computes
    nothing outside DeepSpeed's engine otherwise); a no-op for a model ZeRO-3 does not hold."""
    if not is_partitioned(model):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def held_share(model: Any) -> tuple[int, int]:
    """(parameters this process holds, parameters in the model) of a partitioned model."""
    held = sum(param.ds_tensor.numel() for param in model.parameters())
    whole = sum(param.ds_numel for param in model.parameters())
    return held, whole
