"""Typed schemas for every config group.

Each group owns a small dataclass. Groups with several implementations (method, stage, backend,
launcher) are unions discriminated by their ``name`` field, so code dispatches once with ``match``
on the class instead of comparing strings. Schemas carry no behaviour beyond defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal


class AttnImplementation(str, Enum):
    EAGER = "eager"
    SDPA = "sdpa"
    FLASH_ATTENTION_2 = "flash_attention_2"


class DType(str, Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class SchedulerType(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class DatasetFormat(str, Enum):
    MESSAGES = "messages"


class PreviewFormat(str, Enum):
    TEXT = "text"
    JSONL = "jsonl"


@dataclass
class ModelConfig:
    """Which weights and tokenizer to load, and how."""

    name_or_path: str
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: AttnImplementation = AttnImplementation.SDPA
    dtype: DType = DType.AUTO
    # Build the model from its config.json with random weights (tiny demo/test models).
    from_scratch: bool = False
    # The model family's natural LoRA targets; ``method.target_modules`` overrides them.
    lora_target_modules: list[str] | None = None


@dataclass
class FullMethod:
    """Full-parameter fine-tuning: every weight trains."""

    name: Literal["full"] = "full"


@dataclass
class LoraMethod:
    """peft LoRA adapters on the model's projections."""

    name: Literal["lora"] = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None: the model config's ``lora_target_modules``, else every linear layer but the head.
    target_modules: list[str] | None = None


MethodConfig = FullMethod | LoraMethod


@dataclass
class SftStage:
    """Supervised fine-tuning on chat data, loss on assistant turns only."""

    name: Literal["sft"] = "sft"


StageConfig = SftStage


@dataclass
class DatasetConfig:
    """Where the data lives and how it is cut. Paths are relative to the launch directory."""

    name: str
    train: list[str]
    format: DatasetFormat = DatasetFormat.MESSAGES
    validation: list[str] | None = None
    test: list[str] | None = None
    # Fraction (0 < x < 1) or count (>= 1) of train split off as validation.
    val_size: float | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    split_seed: int = 42


@dataclass
class SingleBackend:
    """One process on one device (GPU if present, else CPU)."""

    name: Literal["single"] = "single"


BackendConfig = SingleBackend


@dataclass
class LocalLauncher:
    """Run the per-rank runner on this machine."""

    name: Literal["local"] = "local"
    nproc_per_node: int = 1
    dry_run: bool = False


LauncherConfig = LocalLauncher


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; mapped onto TrainingArguments in one function."""

    max_steps: int = -1
    num_train_epochs: float = 3.0
    learning_rate: float = 5e-5
    lr_scheduler_type: SchedulerType = SchedulerType.LINEAR
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    eval_steps: int = 100
    # Evaluate before the first step too, so the curve shows where training started.
    eval_on_start: bool = False
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # "auto": continue from the newest checkpoint in the run directory; "never": start fresh
    # (refused if checkpoints exist); or a path to one checkpoint directory.
    resume: str = "auto"
    dataloader_num_workers: int = 0


@dataclass
class RunConfig:
    """The whole resolved config of one training run: what ``config.yaml`` holds."""

    model: ModelConfig
    method: MethodConfig
    stage: StageConfig
    dataset: DatasetConfig
    backend: BackendConfig
    launcher: LauncherConfig
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DataToolConfig(RunConfig):
    """``sala-data``: the training config plus what to show."""

    preview: int = 0
    preview_format: PreviewFormat = PreviewFormat.TEXT
