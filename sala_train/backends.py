"""Backend -> TrainingArguments fields: generated DeepSpeed configs and FSDP settings.

Nothing here is a hand-kept JSON copy: the DeepSpeed dict is built from the backend config with
"auto" wherever the Trainer fills a value from ``train.*`` (batch sizes, accumulation, clipping,
precision), so the two can never disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sala_train.config.schema import (
    BackendConfig,
    DdpBackend,
    FsdpBackend,
    SingleBackend,
    Zero2Backend,
    Zero3Backend,
)
from sala_train.config.typed import ConfigError

DEEPSPEED_FILE = "deepspeed.json"


def _offload(device_wanted: bool) -> dict[str, Any]:
    return {"device": "cpu", "pin_memory": True} if device_wanted else {"device": "none"}


def deepspeed_config(backend: Zero2Backend | Zero3Backend) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO backend (the seed recipe's settings, generated)."""
    zero: dict[str, Any] = {
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "reduce_scatter": True,
        "contiguous_gradients": True,
        "overlap_comm": backend.overlap_comm,
        "offload_optimizer": _offload(backend.offload_optimizer),
    }
    match backend:
        case Zero3Backend():
            zero |= {
                "stage": 3,
                # "auto": the Trainer fills hidden_size² (the seed's ZeRO-2 config leaves DeepSpeed's 5e8).
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # final/ and checkpoints get whole 16-bit weights (and complete LoRA adapters).
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_param": _offload(backend.offload_param),
            }
        case Zero2Backend():
            zero["stage"] = 2
    config: dict[str, Any] = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16},
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "wall_clock_breakdown": False,
    }
    # No "optimizer" block, offload or not: DeepSpeed would build it from one parameter group (biases
    # and norm weights decayed too). The Trainer's AdamW has its decay / no-decay groups, and under
    # ZeRO-Offload accelerate rebuilds it as DeepSpeed's CPU Adam from those groups (adamw_mode only
    # because it is a torch.optim.AdamW: accelerate's map_pytorch_optim_to_deepspeed).
    return config


def skip_unused_deepspeed_kernels(backend: BackendConfig) -> None:
    """Keep DeepSpeed (a ZeRO backend, on its CPU accelerator) from compiling a kernel training
    never runs.

    On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce
    (``deepspeed_shm_comm``, about 35 s of C++ on a machine's first run) as it starts. Only its
    inference all-reduce (tensor-parallel inference) calls it; ZeRO's collectives are
    torch.distributed's, and that all-reduce itself uses torch's when the kernel is missing
    (``deepspeed.comm.torch``). DeepSpeed has no setting for it: its table of usable ops is what it
    reads before building, so the op is marked unusable there. Call before the Trainer starts
    DeepSpeed's backend.
    """
    if not isinstance(backend, Zero2Backend | Zero3Backend) or os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # (probed on first access)
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def fsdp_layer_classes(backend: BackendConfig, model: Any) -> list[str]:
    """The layer classes FSDP wraps: the model's ``_no_split_modules`` that it builds. Given the
    list, accelerate raises for a name the model lacks (a multimodal family's vision block beside
    its text model: Qwen3.5, Gemma 3 and 4, Mllama), a traceback once the model had loaded; it
    filters only a list it finds itself. Under FSDP, a model with none is refused (exit 2)."""
    built = {type(module).__name__ for module in model.modules()}
    declared = sorted(getattr(model, "_no_split_modules", None) or [])  # (some models give a set)
    classes = [name for name in declared if name in built]
    if isinstance(backend, FsdpBackend) and not classes:
        said = f"its _no_split_modules ({', '.join(declared)}) name no layer it builds" if declared else (
            "it names no _no_split_modules")  # fmt: skip
        raise ConfigError([f"backend={backend.name}: FSDP wraps a model's transformer layers, and "
                           f"{type(model).__name__} does not say which ({said}); use backend=zero3, which "
                           "needs no wrapping"])  # fmt: skip
    return classes


def fsdp_settings(backend: FsdpBackend, no_split_modules: list[str], gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments ``fsdp`` / ``fsdp_config`` for one FSDP backend: everything in
    ``fsdp_config`` (transformers reads the older ``fsdp="full_shard auto_wrap ..."`` string with a
    deprecation warning). Full sharding is ``reshard_after_forward``: a bool for FSDP2, the strategy
    name for FSDP1, which also takes the guide's ``BACKWARD_PRE`` prefetch (transformers' FSDP1
    default is none)."""
    assert no_split_modules, "fsdp_layer_classes refuses a model with none"
    config: dict[str, Any] = {
        "version": backend.version,
        "transformer_layer_cls_to_wrap": list(no_split_modules),
        "state_dict_type": "SHARDED_STATE_DICT" if backend.sharded_checkpoints else "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": True,
        "sync_module_states": True,
        "use_orig_params": True,
        "cpu_offload": backend.cpu_offload,
        "activation_checkpointing": gradient_checkpointing,
    }
    if backend.version == 1:
        config |= {
            "reshard_after_forward": "full_shard",
            "backward_prefetch": "BACKWARD_PRE",
            "forward_prefetch": False,
        }
    else:
        config |= {"reshard_after_forward": True}
    return {"fsdp": True, "fsdp_config": config}


def keep_fsdp2_layer_wrapping(trainer: Any) -> None:
    """Under FSDP2 each transformer layer keeps its own ``fully_shard`` with a LoRA model too.

    For a peft model under FSDP the Trainer swaps the plugin's wrap policy for peft's FSDP1 policy
    (``update_fsdp_plugin_peft``, just before ``accelerator.prepare``), which accelerate's FSDP2 path
    does not read (``fsdp2_prepare_auto_wrap_policy`` returns None): no layer was sharded on its
    own (the whole decoder gathered at once, silently), and with activation checkpointing
    ``fsdp2_apply_ac`` called that None. FSDP2 shards frozen and trainable weights of one layer
    together, so the layer policy sala-train set is the right one: it is put back as ``prepare``
    starts. (FSDP1 needs peft's policy, and keeps it.)"""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        return
    policy, prepare = plugin.auto_wrap_policy, trainer.accelerator.prepare

    def prepare_with_layer_wrapping(*args: Any, **kwargs: Any) -> Any:
        plugin.auto_wrap_policy = policy
        return prepare(*args, **kwargs)

    trainer.accelerator.prepare = prepare_with_layer_wrapping


def write_deepspeed_config(backend: BackendConfig, run_dir: Path) -> Path | None:
    """Save the generated DeepSpeed config beside config.yaml, for the record (ranks rebuild it)."""
    if not isinstance(backend, (Zero2Backend, Zero3Backend)):
        return None
    path = run_dir / DEEPSPEED_FILE
    path.write_text(json.dumps(deepspeed_config(backend), indent=2) + "\n", encoding="utf-8")
    return path


def backend_arguments(
    backend: BackendConfig, no_split_modules: list[str], gradient_checkpointing: bool
) -> dict[str, Any]:
    """The TrainingArguments fields that depend on the backend."""
    match backend:
        case SingleBackend():
            return {}
        case DdpBackend():
            return {"ddp_find_unused_parameters": backend.find_unused_parameters}
        case Zero2Backend() | Zero3Backend():
            return {"deepspeed": deepspeed_config(backend)}
        case FsdpBackend():
            settings = fsdp_settings(backend, no_split_modules, gradient_checkpointing)
            # FSDP does activation checkpointing itself; the Trainer's flag would wrap twice.
            from sala_train.arguments import CHECKPOINTING_ARGUMENT

            return settings | {CHECKPOINTING_ARGUMENT: False}
    raise AssertionError(backend)
