"""Per-GPU memory of model states before launching: parameters, gradients, optimizer states.

With mixed precision (``train.bf16`` / ``train.fp16``) the DeepSpeed arithmetic is DeepSpeed's own
(``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs``, whose
documentation accelerate points to): a trained parameter costs 2 bytes of 16-bit weight on the GPU
plus 18 bytes of 16-bit and 32-bit gradients, 32-bit master weight and Adam moments; ZeRO-2 shards
the 18, ZeRO-3 shards everything and keeps the largest layer gathered (4 bytes per parameter of
it), offload moves the sharded part to CPU memory (with DeepSpeed's 1.5 buffer factor). In 32-bit
DeepSpeed keeps 4-byte weights and 16 bytes of gradients, master copy and moments. FSDP (accelerate)
keeps trained parameters in 32 bits, sharded: weight, gradient and two moments, 16 bytes. Single
and DDP keep the model as loaded: weight, gradient and moments in its dtype, 4 of them per trained
parameter (LoRA's adapters are 32-bit). A frozen parameter (LoRA's base model) costs its weight
only. Activations are not included: they depend on batch shape and checkpointing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sala_train.config.schema import (
    BackendConfig,
    DdpBackend,
    DpoStage,
    DType,
    FsdpBackend,
    FullMethod,
    KtoStage,
    LoraMethod,
    ModelConfig,
    RunConfig,
    SingleBackend,
    Zero2Backend,
    Zero3Backend,
    Zero3OffloadBackend,
)
from sala_train.config.typed import ConfigError

GIB = 1024**3
WEIGHT, STATES = 2, 18  # DeepSpeed, mixed precision: 16-bit weight; grads + fp32 master + Adam moments
WEIGHT_32, STATES_32 = 4, 16  # DeepSpeed in 32 bits; also FSDP's 32-bit trained parameters (16 in all)
BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
FIT_MARGIN = 0.9  # leave room for activations, buffers and fragmentation


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    largest_layer: int  # the most parameters gathered at once: a block, or a module's own (embeddings)
    weight_bytes: int = 2  # of a parameter as loaded (model.dtype, or the checkpoint's with auto)
    checkpoint_bytes: int = 0  # of the checkpoint as stored, which zero.Init's rank 0 reads (0: not known)
    # FSDP's root unit: every parameter outside the wrapped blocks (embeddings, head, final norm),
    # gathered together and kept so through the step (0: not known; the largest layer stands in)
    root_unit: int = 0


@dataclass(frozen=True)
class Estimate:
    gpu_bytes: float  # per GPU
    cpu_bytes: float  # offloaded, per node


def count_parameters(model_cfg: ModelConfig, method: Any) -> ParameterCounts:
    """Count parameters on the meta device (no weights loaded), and the LoRA parameters."""
    import torch
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
    stored = stored_weight_bytes(model_cfg) or total * _bytes_of(getattr(config, "dtype", None))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    # ZeRO-3 gathers a module's own parameters (the embeddings are the largest in most LLMs), FSDP a
    # wrapped block: the most of either is what one GPU holds whole at a time.
    largest = max(sum(p.numel() for p in m.parameters(recurse=type(m).__name__ in blocks)) for m in model.modules())
    in_blocks = {id(p) for m in model.modules() if type(m).__name__ in blocks for p in m.parameters()}
    root_unit = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    trainable = total
    if isinstance(method, LoraMethod):
        from sala_train.methods import apply_method

        # peft itself adapts the meta model, as the run will: every layer kind it adapts
        # (embeddings, fused MoE expert weights, not only nn.Linear) is counted as it sizes it.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (peft's warnings are the run's to give, not the estimate's)
            adapted = apply_method(method, model, model_cfg, gradient_checkpointing=False)
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        total = sum(p.numel() for p in adapted.parameters())
    return ParameterCounts(total, trainable, largest, weight_bytes(model_cfg, config), stored, root_unit)


def loads_partitioned(cfg: RunConfig, bytes_per_weight: int) -> bool:
    """Whether ZeRO-3 loads the run's model partitioned (sala_train.zero3_loading says why not
    always); ``bytes_per_weight``: of a parameter as loaded."""
    if not isinstance(cfg.backend, Zero3Backend) or cfg.model.from_scratch:
        return False
    return cfg.train.bf16 or cfg.train.fp16 or bytes_per_weight == 4


def weight_bytes(model_cfg: ModelConfig, config: Any) -> int:
    """Bytes of a parameter as loaded: ``model.dtype``'s, or with auto the checkpoint's (``config``)."""
    return _bytes_of(model_cfg.dtype.value if model_cfg.dtype is not DType.AUTO else getattr(config, "dtype", None))


def _bytes_of(dtype: Any) -> int:
    return 2 if str(dtype).removeprefix("torch.") in ("bfloat16", "float16") else 4


def stored_weight_bytes(model_cfg: ModelConfig) -> int:
    """The size of the model's weight files here (safetensors where a directory has both kinds, as
    transformers loads them), whatever ``model.dtype`` converts them to; 0 when there are none."""
    from sala_train.base_weights import WEIGHT_PATTERNS, weights_directory

    directory = weights_directory(model_cfg)
    if directory is None:
        return 0
    for pattern in WEIGHT_PATTERNS:  # (safetensors first)
        sizes = [path.stat().st_size for path in directory.glob(pattern) if path.is_file()]
        if sizes:
            return sum(sizes)
    return 0


def estimate(
    backend: BackendConfig, counts: ParameterCounts, world: int, nodes: int, mixed: bool = True, reference: bool = False
) -> Estimate:
    """Model-state bytes per GPU, and per node's CPU memory for offload, under ``backend``
    (``mixed``: train.bf16 / train.fp16; ``reference``: full DPO/KTO's frozen copy of the model)."""
    states = _model_states(backend, counts, world, nodes, mixed)
    if not reference:
        return states
    copy = _reference_copy(backend, counts, world, nodes, mixed)
    return Estimate(states.gpu_bytes + copy.gpu_bytes, states.cpu_bytes + copy.cpu_bytes)


def _reference_copy(backend: BackendConfig, counts: ParameterCounts, world: int, nodes: int, mixed: bool) -> Estimate:
    """The frozen reference model of full DPO/KTO, its weights only, placed as TRL prepares it:
    a whole copy per GPU (ZeRO-2's reference runs as stage 0), sharded under ZeRO-3 and FSDP, on
    the CPU where their parameters are offloaded. (LoRA's reference is a copy of the adapter.)"""
    total = counts.total
    match backend:
        case SingleBackend() | DdpBackend():
            return Estimate(counts.weight_bytes * total, 0)
        case FsdpBackend(cpu_offload=True):
            return Estimate(0, counts.weight_bytes * total / nodes)
        case FsdpBackend():
            return Estimate(counts.weight_bytes * total / world, 0)
    weights = (WEIGHT if mixed else WEIGHT_32) * total
    match backend:
        case Zero3Backend(offload_param=True):
            return Estimate(0, weights / nodes)
        case Zero3Backend():
            return Estimate(weights / world, 0)
    return Estimate(weights, 0)


def _model_states(backend: BackendConfig, counts: ParameterCounts, world: int, nodes: int, mixed: bool) -> Estimate:
    trained, frozen = counts.trainable, counts.total - counts.trainable
    match backend:
        case SingleBackend() | DdpBackend():
            per_trained = 16 if frozen else 4 * counts.weight_bytes  # (LoRA's adapters: 32-bit)
            # DDP all-reduces through buckets that hold a copy of the gradients (accelerate leaves
            # gradient_as_bucket_view off, and the Trainer offers no way to turn it on).
            ddp = isinstance(backend, DdpBackend) and world > 1  # (one process is not wrapped in DDP)
            buckets = (4 if frozen else counts.weight_bytes) * trained if ddp else 0
            return Estimate(counts.weight_bytes * frozen + per_trained * trained + buckets, 0)
    # accelerate upcasts FSDP's trained weights to float32 under mixed precision only: without it,
    # 16-bit weights train as they are (weight, gradient and Adam's two moments in their dtype).
    fsdp_trained = STATES_32 if mixed or frozen else 4 * counts.weight_bytes
    # accelerate wraps each block and then the root, whose unit holds the rest (an untied head with
    # the embeddings): the larger of the two is gathered at once.
    gathered = 4 * max(counts.largest_layer, counts.root_unit)
    match backend:
        case FsdpBackend(cpu_offload=True):
            return Estimate(gathered, (fsdp_trained * trained + counts.weight_bytes * frozen) / nodes)
        case FsdpBackend():
            return Estimate(gathered + (fsdp_trained * trained + counts.weight_bytes * frozen) / world, 0)
    weight, states = (WEIGHT, STATES) if mixed else (WEIGHT_32, STATES_32)
    weights = weight * counts.total
    gathered = 4 * counts.largest_layer
    match backend:
        case Zero2Backend(offload_optimizer=True):
            # 32-bit master weight, gradient and moments, sharded across every process. (DeepSpeed's
            # estimator takes max(4 x processes, 16) bytes: its 4 per process is their loading, which
            # the dry run says on its own line, per node.)
            return Estimate(weights, STATES_32 * trained / nodes * BUFFER)
        case Zero2Backend():
            return Estimate(weights + states * trained / world, 0)
        case Zero3Backend(offload_optimizer=True, offload_param=True):
            return Estimate(gathered, (states * trained + weight * frozen) / nodes * BUFFER)
        case Zero3Backend(offload_optimizer=True):
            return Estimate(gathered + weights / world, (states - weight) * trained / nodes * BUFFER)
        case Zero3Backend(offload_param=True):  # (DeepSpeed's estimator has no case for parameters alone)
            return Estimate(gathered + (states - weight) * trained / world, weights / nodes * BUFFER)
        case Zero3Backend():
            return Estimate(gathered + (states * trained + weight * frozen) / world, 0)
    raise AssertionError(backend)


# Backends to suggest, fastest first: offload only when nothing else fits. (The first is single
# or ddp, by the process count.)
CANDIDATES: list[tuple[str, BackendConfig]] = [
    ("zero2", Zero2Backend()),
    ("zero3", Zero3Backend()),
    ("zero2 backend.offload_optimizer=true", Zero2Backend(offload_optimizer=True)),
    ("zero3 backend.offload_optimizer=true", Zero3Backend(offload_optimizer=True)),
    ("zero3_offload", Zero3OffloadBackend()),
]


@dataclass(frozen=True)
class Capacity:
    """What the estimate is checked against: memory per GPU and CPU memory per node, in GiB (None:
    unknown, with the line that says how to give it)."""

    gpu_gib: float | None
    cpu_gib: float | None
    gpu_unknown: str = "# memory: no GPU here; set launcher.gpu_memory_gib to check the fit"
    cpu_unknown: str = "# memory: CPU memory per node unknown; set launcher.cpu_memory_gib to check the offload"


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _gib(n: float) -> str:
    """A memory size as given in GiB: 80, 139.7, 2048, 0.00781."""
    return f"{n:.1f}".removesuffix(".0") if n >= 1 else f"{n:.3g}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def counts_or_why_not(cfg: RunConfig) -> ParameterCounts | str:
    """The model's parameter counts, or the one-line reason a dry run has no estimate (the model's
    config not on this machine, its code not importable). LoRA targets peft refuses for the model
    raise ConfigError: the run would stop on them, so the dry run stops on them too."""
    from sala_train.errors import unloadable

    try:
        return count_parameters(cfg.model, cfg.method)
    except ConfigError:
        raise
    except OSError:
        # A remote-code model (auto_map) needs its code files beside config.json to be built.
        files = "--include '*.json' '*.py'" if cfg.model.trust_remote_code else "config.json"
        revision = f" --revision {cfg.model.revision}" if cfg.model.revision else ""  # (the one the run pins)
        return (
            f"the config of {cfg.model.name_or_path} is not on this machine; "
            f"download it once, without the weights (hf download {cfg.model.name_or_path}{revision} {files})"
        )
    except unloadable() as exc:  # (a remote-code package not installed, a config.json its class refuses, ...)
        from sala_train.load_errors import refuse_what_transformers_words_for_itself

        # What the run refuses (a T5 config: no causal LM), the dry run refuses too, in its words.
        refuse_what_transformers_words_for_itself(cfg.model, exc)
        return str(exc).strip().splitlines()[0]


def report(cfg: RunConfig, counts: ParameterCounts | str, world: int, nodes: int, capacity: Capacity) -> list[str]:
    """Dry-run lines: the estimate (from ``counts_or_why_not``), and a warning naming a backend
    that fits when this one won't."""
    if isinstance(counts, str):
        return [f"# memory: no estimate: {counts}"]
    mixed = cfg.train.bf16 or cfg.train.fp16
    reference = isinstance(cfg.stage, DpoStage | KtoStage) and isinstance(cfg.method, FullMethod)
    mine = estimate(cfg.backend, counts, world, nodes, mixed, reference)
    lines = [
        f"# memory: {_count(counts.total)} parameters, {_count(counts.trainable)} trained; "
        f"model states per GPU under backend={cfg.backend.name} x {world} process(es): {_bytes(mine.gpu_bytes)}"
        + (f" (+{_bytes(mine.cpu_bytes)} of CPU memory per node)" if mine.cpu_bytes else "")
        + (f" (stage={cfg.stage.name}'s frozen reference model included)" if reference else "")
        + " (activations not included)"
    ]
    gpu, cpu = capacity.gpu_gib, capacity.cpu_gib
    gpu_budget = gpu * GIB * FIT_MARGIN if gpu is not None else None
    cpu_budget = cpu * GIB * FIT_MARGIN if cpu is not None else None
    per_node = max(world // max(nodes, 1), 1)

    def loading_of(backend: BackendConfig) -> float | None:
        return _loading_bytes(replace(cfg, backend=backend), counts, per_node)

    loading, advice_prefix = loading_of(cfg.backend), ""
    if loading is not None and loads_partitioned(cfg, counts.weight_bytes):  # (DeepSpeed's zero_init=1)
        lines.append(f"# memory: loading, partitioned as it loads (zero.Init): rank 0 reads the whole model into CPU "
                     f"memory, {_bytes(loading)}, and each process keeps its partition")  # fmt: skip
    elif loading is not None:
        advice_prefix = "run fewer processes per node (launcher.nproc_per_node), or "
        lines.append(f"# memory: loading, each of a node's {per_node} processes holds the whole model in CPU memory "
                     f"first: {_bytes(loading)} per node")  # fmt: skip
    if loading is not None and cpu is not None and cpu_budget is not None and loading > cpu_budget:
        lines.append(f"# WARNING: loading will not fit in {_gib(cpu)} GiB of CPU memory per node; "
                     f"{advice_prefix}use nodes with more memory")  # fmt: skip
    if gpu is None:
        lines.append(capacity.gpu_unknown)
    if mine.cpu_bytes and cpu is None:
        lines.append(capacity.cpu_unknown)
    short = []  # what this backend overruns
    if gpu is not None and gpu_budget is not None and mine.gpu_bytes > gpu_budget:
        short.append(f"{_gib(gpu)} GiB per GPU")
    if cpu is not None and cpu_budget is not None and mine.cpu_bytes > cpu_budget:
        short.append(f"{_gib(cpu)} GiB of CPU memory per node")
    if not short:
        checked = [f"{_gib(gpu)} GiB per GPU"] if gpu is not None else []
        checked += [f"{_gib(cpu)} GiB of CPU memory per node"] if mine.cpu_bytes and cpu is not None else []
        return [*lines, f"# memory: fits in {' and '.join(checked)}"] if checked else lines
    advice = _advice(counts, world, nodes, mixed, gpu_budget, cpu_budget, reference, cfg.backend, loading_of)
    return [*lines, f"# WARNING: will not fit in {' and '.join(short)}; {advice}"]


def _loading_bytes(cfg: RunConfig, counts: ParameterCounts, per_node: int) -> float | None:
    """CPU memory per node while the model loads, where it is more than one process's copy (None):
    under ZeRO-3's partitioned loading rank 0 reads the whole checkpoint; else, with several
    processes on a node, each loads the model before DeepSpeed or DDP places it (DeepSpeed's
    estimator's zero_init=0). FSDP's cpu_ram_efficient_loading is meant to load one copy per node;
    not counted here."""
    one_copy = counts.weight_bytes * counts.total
    if loads_partitioned(cfg, counts.weight_bytes):
        return counts.checkpoint_bytes or one_copy  # (read as stored: model.dtype converts it after)
    if per_node > 1 and not isinstance(cfg.backend, FsdpBackend):
        return per_node * one_copy
    return None


def _advice(counts: ParameterCounts, world: int, nodes: int, mixed: bool, gpu_budget: float | None,
            cpu_budget: float | None, reference: bool, current: BackendConfig,
            loading_of: Callable[[BackendConfig], float | None]) -> str:  # fmt: skip
    """The fastest backend whose GPU and CPU memory both fit, loading included (``loading_of``), or
    why none does (``current``: the run's backend, whose own settings the advice overrides where
    they differ). Advising DDP to a node that cannot hold a copy per process sent the user from one
    warning to another."""
    if gpu_budget is None:
        return "set launcher.gpu_memory_gib to have a backend that fits named"
    first: tuple[str, BackendConfig] = ("single", SingleBackend()) if world == 1 else ("ddp", DdpBackend())
    own: list[tuple[str, BackendConfig]] = []
    if isinstance(current, FsdpBackend):  # (an FSDP run, CUDA: its own offload first, then DeepSpeed's)
        own = [(current.name, replace(current, cpu_offload=flag)) for flag in (False, True)]
    estimates = [(_as_typed(label, backend, current), backend,
                  estimate(backend, counts, world, nodes, mixed, reference))
                 for label, backend in [first, *own, *CANDIDATES]]  # fmt: skip
    on_gpu = [(label, backend, e) for label, backend, e in estimates if e.gpu_bytes <= gpu_budget]
    for label, backend, e in on_gpu:
        loading = loading_of(backend)
        if cpu_budget is None or (e.cpu_bytes <= cpu_budget and (loading is None or loading <= cpu_budget)):
            master = ""
            if (
                isinstance(backend, SingleBackend | DdpBackend)
                and counts.weight_bytes == 2
                and counts.trainable == counts.total
            ):
                # (what _warn_of_16_bit_weights_without_a_master_copy says at the run's start)
                master = " (training the 16-bit weights themselves, with no float32 master copy; ZeRO keeps one)"
            if cpu_budget is None and e.cpu_bytes:
                return (f"backend={label} would fit on the GPUs, with {_bytes(e.cpu_bytes)} of CPU memory per node "
                        "that nothing here checks (set launcher.cpu_memory_gib)")  # fmt: skip
            return f"backend={label} would fit{master}"
    if not on_gpu:
        # The last candidate, ZeRO-3 with offload, holds only the gathered largest layer on a GPU:
        # when even that does not fit, neither more GPUs nor LoRA help.
        return (f"no backend fits: even ZeRO-3 with offload gathers the largest layer ({_count(counts.largest_layer)} "
                f"parameters, {_bytes(4 * counts.largest_layer)}) on each GPU; use GPUs with more memory")  # fmt: skip
    assert cpu_budget is not None  # (without one, the first backend on the GPUs was advised)
    # Backends whose model states fit both but whose loading does not: "needs offload" was wrong there.
    loads = [(loading_of(backend) or 0.0, label) for label, backend, e in on_gpu if e.cpu_bytes <= cpu_budget]
    if loads:
        loading, label = min(loads)
        fewer = ", or fewer processes per node" if loading > counts.weight_bytes * counts.total else ""
        return (f"no backend fits: backend={label} fits on the GPUs, but loading the model takes "
                f"{_bytes(loading)} of CPU memory per node (the least of the backends that fit on the GPUs); "
                f"use nodes with more memory{fewer}")  # fmt: skip
    label, _, least = min(on_gpu, key=lambda item: item[2].cpu_bytes)
    lora = "" if counts.trainable < counts.total else ", or method=lora"
    return (f"no backend fits: these GPUs need offload, and the least it takes (backend={label}) is "
            f"{_bytes(least.cpu_bytes)} of CPU memory per node; add nodes or GPUs, use nodes with more "
            f"memory{lora}")  # fmt: skip


def _as_typed(label: str, backend: BackendConfig, current: BackendConfig | None) -> str:
    """The advice's ``backend=...`` as the user must type it: a candidate of the run's own backend
    kind names each offload setting the run set otherwise (``backend=zero2`` advised to a run with
    ``backend.offload_optimizer=true`` would keep its offload)."""
    if current is None or current.name != backend.name:
        return label
    for key in ("offload_optimizer", "offload_param", "cpu_offload"):
        value = getattr(backend, key, None)
        if value is not None and getattr(current, key, None) != value and f"backend.{key}=" not in label:
            label += f" backend.{key}={str(value).lower()}"
    return label


def visible_cpu_memory_gib() -> float:
    """This machine's memory, or less where a cgroup this process is in limits it (a container, a
    SLURM job step): the lowest limit on the way from its cgroup to the root, v2 or v1."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return round(min([total, *_cgroup_limits()]) / GIB, 1)


def _cgroup_limits(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> list[int]:
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:  # "0::/path" (v2), "N:memory:/path" (v1)
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        for directory in (here, *here.parents):
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limits.append(int(text))
            if directory == base:
                break
    return limits


def visible_gpu_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(float(torch.cuda.get_device_properties(0).total_memory) / GIB, 1)
