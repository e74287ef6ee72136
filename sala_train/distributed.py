"""Check that the processes we got are the ones the config asked for (no silent fallbacks).

On CPU, accelerate quietly turns FSDP into DDP or independent jobs, and torchrun DDP without
``use_cpu`` trains unsynchronised copies with only a warning. Each rank checks what it actually
got after the Trainer is built, and the replicas are compared after training.

torch is imported where it is used: the CLI asks ``refuse_unsupported`` before it may load torch
(a bad record is found first), and only a run asking for FSDP or fp16 needs torch to answer.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from sala_train.config.schema import (
    DdpBackend,
    FsdpBackend,
    RunConfig,
    SingleBackend,
    Zero2Backend,
    Zero3Backend,
)
from sala_train.console import say
from sala_train.errors import DistributedSetupError
from sala_train.launch.plan import world_size

T = TypeVar("T")


def refuse_unsupported(cfg: RunConfig) -> None:
    """Backends this machine cannot run as asked, refused before anything loads."""
    if not (cfg.train.fp16 or isinstance(cfg.backend, FsdpBackend)):
        return  # (nothing to ask torch)
    import torch

    if cfg.train.fp16 and not torch.cuda.is_available():
        raise DistributedSetupError(
            "train.fp16=true needs a CUDA GPU: on CPU accelerate silently trains in float32 instead. "
            "Use train.bf16=true (CPU autocast) or neither."
        )
    if isinstance(cfg.backend, FsdpBackend) and not torch.cuda.is_available():
        raise DistributedSetupError(
            f"backend={cfg.backend.name} needs CUDA GPUs: on CPU the Trainer would silently run DDP or "
            "independent copies instead of FSDP. Use backend=ddp or backend=zero3 on CPU."
        )


def _expected_types(cfg: RunConfig, processes: int) -> set[str]:
    match cfg.backend:
        case SingleBackend():
            return {"NO"}
        case DdpBackend():
            return {"MULTI_GPU", "MULTI_CPU"} if processes > 1 else {"NO", "MULTI_GPU", "MULTI_CPU"}
        case Zero2Backend() | Zero3Backend():
            return {"DEEPSPEED"}
        case FsdpBackend():
            return {"FSDP"}
    raise AssertionError(cfg.backend)


def node_name() -> str:
    """The node as SLURM names it (several slurmd nodes may share one host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def one_gpu_for_one_process(environ: Any = os.environ) -> None:
    """``backend=single``: one process on one GPU, the first visible one. On a machine with several,
    the Trainer wraps the model in ``torch.nn.DataParallel`` over all of them (its ``n_gpu`` is
    the device count), which multiplies the batch by the GPU count without a word and splits each
    batch between them. Called before CUDA starts, which reads ``CUDA_VISIBLE_DEVICES`` once."""
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):  # (ROCm's torch reads HIP's first)
        visible = environ.get(name)
        if visible is None and name == "CUDA_VISIBLE_DEVICES":
            environ[name] = "0"
        elif visible is not None and visible.strip():
            environ[name] = visible.split(",")[0].strip()


def check_setup(cfg: RunConfig, trainer: Any) -> None:
    """Stop unless the world size and the distributed type are what the config asked for."""
    expected = world_size(cfg)
    actual = trainer.args.world_size
    if actual != expected:
        raise DistributedSetupError(
            f"launcher asked for {expected} process(es) but this rank sees a world of {actual}; "
            "the processes did not join one group"
        )
    _check_the_nodes_share_one_config()
    kind = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    if expected > 1:
        say(f"sala-train: rank {trainer.args.process_index} of {actual} on {node_name()} ({kind})")
    if trainer.args.n_gpu > 1:  # (one_gpu_for_one_process came too late: CUDA had started)
        raise DistributedSetupError(
            f"backend={cfg.backend.name} runs one process on one GPU, but the Trainer would spread it over "
            f"{trainer.args.n_gpu} with torch.nn.DataParallel (the batch multiplied by as many); set "
            "CUDA_VISIBLE_DEVICES (HIP_VISIBLE_DEVICES on ROCm) to one GPU, or use backend=ddp with "
            "launcher.nproc_per_node"
        )
    wanted = _expected_types(cfg, expected)
    if kind not in wanted:
        raise DistributedSetupError(
            f"backend={cfg.backend.name} asked for {' or '.join(sorted(wanted))} but the Trainer set up {kind}"
        )


def _check_the_nodes_share_one_config() -> None:
    """Nodes started by hand (``launcher=multinode``) must run one config: each node's launcher
    passes its own (``NODE_CONFIG_ENV``), since the config.yaml they share is the last writer's.
    Nodes started with another learning rate, or another ``launcher.nnodes``, trained on one of
    them without a word."""
    import json

    import torch

    from sala_train.checkpoints import flatten_config
    from sala_train.launch.plan import NODE_CONFIG_ENV

    given = os.environ.get(NODE_CONFIG_ENV)
    if given is None or not torch.distributed.is_initialized():
        return
    node, _, mine = given.partition(":")
    gathered: list[tuple[int, str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (int(node), mine))
    configs = {n: c for n, c in sorted(item for item in gathered if item is not None)}
    if len(set(configs.values())) == 1:
        return
    first, first_config = next(iter(configs.items()))
    other, other_config = next((n, c) for n, c in configs.items() if c != first_config)
    ours, theirs = (flatten_config(json.loads(c)) for c in (first_config, other_config))
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    shown = [f"{k}: {ours.get(k)!r} on node {first}, {theirs.get(k)!r} on node {other}" for k in keys[:4]]
    more = f", and {len(keys) - 4} more" if len(keys) > 4 else ""
    raise DistributedSetupError(
        f"launcher=multinode: the nodes were started with different configs ({'; '.join(shown)}{more}); every "
        "node must run the same command, with only launcher.node_rank changed"
    )


def parameter_digest(model: Any) -> str:
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(cfg: RunConfig, model: Any) -> None:
    """DDP: every rank must end with the same weights, or it was not synchronising."""
    import torch

    if not isinstance(cfg.backend, DdpBackend) or not torch.distributed.is_initialized():
        return
    mine = parameter_digest(model)
    rank = torch.distributed.get_rank()
    say(f"sala-train: rank {rank} weights sha256 {mine}")
    digests: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise DistributedSetupError(
            f"DDP ranks ended with different weights ({len(set(digests))} distinct copies): "
            "gradients were not synchronised"
        )


def fail_together(action: Callable[[], T], problem_type: type[Exception]) -> T:
    """``action()`` on every rank, and its problem (a ``problem_type``) raised on every rank if any
    rank has one. Where only some ranks can meet it (under zero.Init rank 0 alone reads the weights'
    values) or where a rank going on alone would wait for the others in a collective (the packing
    check inside DeepSpeed's engine), every rank raises instead, and the runner prints it once."""
    import torch.distributed as dist

    result, problem = None, None
    try:
        result = action()
    except problem_type as exc:
        problem = exc
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if problem is None else str(problem))
    if problem is not None:
        raise problem
    first = next((text for text in problems if text is not None), None)
    if first is not None:
        raise problem_type(first)
    return result  # type: ignore[return-value]
