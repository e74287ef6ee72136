"""Per-GPU memory of model states before launching: parameters, gradients, optimizer states.

The arithmetic is DeepSpeed's own (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, whose documentation accelerate points to): a trained
parameter costs 2 bytes of 16-bit weight on the GPU plus 18 bytes of 16-bit and 32-bit gradients,
32-bit master weight and Adam moments; ZeRO-2 shards the 18, ZeRO-3 and FSDP shard everything and
keep the largest layer gathered (4 bytes per parameter of it), offload moves the sharded part to
CPU memory (with DeepSpeed's 1.5 buffer factor). A frozen parameter (LoRA's base model) costs its
16-bit weight only. Activations are not included: they depend on batch shape and checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sala_train.config.schema import (
    BackendConfig,
    DdpBackend,
    FsdpBackend,
    LoraMethod,
    ModelConfig,
    RunConfig,
    SingleBackend,
    Zero2Backend,
    Zero3Backend,
    Zero3OffloadBackend,
)

GIB = 1024**3
WEIGHT, STATES = 2, 18  # bytes per parameter: 16-bit weight; grads + fp32 master + Adam moments
BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
FIT_MARGIN = 0.9  # leave room for activations, buffers and fragmentation


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    largest_layer: int


@dataclass(frozen=True)
class Estimate:
    gpu_bytes: float  # per GPU
    cpu_bytes: float  # offloaded, per node


def count_parameters(model_cfg: ModelConfig, method: Any) -> ParameterCounts:
    """Count parameters on the meta device (no weights loaded), and the LoRA parameters."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    # Local files only: a dry run must answer at once, not wait on hub retries.
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code, "local_files_only": True}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    config = AutoConfig.from_pretrained(model_cfg.name_or_path, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=model_cfg.trust_remote_code
        )
    total = sum(p.numel() for p in model.parameters())
    layers = [m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or [])]
    largest = max((sum(p.numel() for p in m.parameters()) for m in layers), default=total)
    trainable = total
    if isinstance(method, LoraMethod):
        from sala_train.methods import ALL_LINEAR, lora_targets

        targets = lora_targets(method, model_cfg)
        trainable = 0
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            hit = leaf != "lm_head" if targets == ALL_LINEAR else leaf in targets
            if hit:
                trainable += method.r * (module.in_features + module.out_features)
        total += trainable
    return ParameterCounts(total=total, trainable=trainable, largest_layer=largest)


def estimate(backend: BackendConfig, counts: ParameterCounts, world: int, nodes: int) -> Estimate:
    """Model-state bytes per GPU, and per node's CPU memory for offload, under ``backend``."""
    trained, frozen = counts.trainable, counts.total - counts.trainable
    weights = WEIGHT * counts.total
    gathered = 4 * counts.largest_layer
    match backend:
        case SingleBackend() | DdpBackend():
            return Estimate(weights + STATES * trained, 0)
        case Zero2Backend(offload_optimizer=True):
            return Estimate(weights, trained * max(4 * world, 16) * BUFFER)
        case Zero2Backend():
            return Estimate(weights + STATES * trained / world, 0)
        case Zero3Backend(offload_optimizer=True, offload_param=True) | FsdpBackend(cpu_offload=True):
            return Estimate(gathered, (STATES * trained + WEIGHT * frozen) / nodes * BUFFER)
        case Zero3Backend(offload_optimizer=True):
            return Estimate(gathered + weights / world, (STATES - WEIGHT) * trained / nodes * BUFFER)
        case Zero3Backend() | FsdpBackend():
            return Estimate(gathered + (STATES * trained + WEIGHT * frozen) / world, 0)
    raise AssertionError(backend)


CANDIDATES: list[BackendConfig] = [SingleBackend(), Zero2Backend(), Zero3Backend(), Zero3OffloadBackend()]


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def report(cfg: RunConfig, world: int, nodes: int, gpu_memory_gib: float | None) -> list[str]:
    """Dry-run lines: the estimate, and a warning naming a backend that fits when this one won't."""
    try:
        counts = count_parameters(cfg.model, cfg.method)
    except OSError:
        # A remote-code model (auto_map) needs its code files beside config.json to be built.
        files = "--include '*.json' '*.py'" if cfg.model.trust_remote_code else "config.json"
        return [
            f"# memory: no estimate: the config of {cfg.model.name_or_path} is not on this machine; "
            f"download it once, without the weights (hf download {cfg.model.name_or_path} {files})"
        ]
    except (ValueError, ImportError) as exc:  # ImportError: its remote code needs a package not installed
        return [f"# memory: no estimate: {str(exc).strip().splitlines()[0]}"]
    mine = estimate(cfg.backend, counts, world, nodes)
    lines = [
        f"# memory: {_count(counts.total)} parameters, {_count(counts.trainable)} trained; "
        f"model states per GPU under backend={cfg.backend.name} x {world} process(es): {_bytes(mine.gpu_bytes)}"
        + (f" (+{_bytes(mine.cpu_bytes)} of CPU memory per node)" if mine.cpu_bytes else "")
        + " (activations not included)"
    ]
    if gpu_memory_gib is None:
        return [*lines, "# memory: no GPU here; set launcher.gpu_memory_gib to check the fit"]
    budget = gpu_memory_gib * GIB * FIT_MARGIN
    if mine.gpu_bytes <= budget:
        return [*lines, f"# memory: fits in {gpu_memory_gib:g} GiB per GPU"]
    fitting = [b for b in CANDIDATES if estimate(b, counts, world, nodes).gpu_bytes <= budget]
    lora = "" if isinstance(cfg.method, LoraMethod) else " or use method=lora"
    advice = f"backend={fitting[0].name} would fit" if fitting else f"no backend fits: add GPUs{lora}"
    return [*lines, f"# WARNING: will not fit in {gpu_memory_gib:g} GiB per GPU; {advice}"]


def visible_gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) / GIB
