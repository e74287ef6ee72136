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
    # PyTorch's own variable-length flash attention for packed batches (CUDA; no flash-attn build).
    SALA_VARLEN = "sala_varlen"


class LigerMode(str, Enum):
    AUTO = "auto"  # on for supported architectures on CUDA, off on CPU and for muP-scaled logits
    TRUE = "true"
    FALSE = "false"


class DType(str, Enum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class LoraInit(str, Enum):
    """How peft starts the adapters' A matrices (B starts at zero either way, so training starts
    from the base model): peft's default, Kaiming-uniform, or OpenBMB finetune.py's ``gaussian``."""

    DEFAULT = "default"
    GAUSSIAN = "gaussian"


class SaveStrategy(str, Enum):
    STEPS = "steps"  # a checkpoint every train.save_steps
    EPOCH = "epoch"  # a checkpoint at the end of every epoch (LLaMA-Factory's save_strategy: epoch)


class EvalStrategy(str, Enum):
    STEPS = "steps"  # every train.eval_steps (and at the last step)
    EPOCH = "epoch"  # at the end of every epoch (LLaMA-Factory's eval_strategy: epoch)


class SchedulerType(str, Enum):
    LINEAR = "linear"
    COSINE = "cosine"
    # Cosine down to ``train.min_lr_rate`` of the peak, not to zero (transformers' own schedule).
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class DatasetFormat(str, Enum):
    MESSAGES = "messages"  # OpenAI / ChatML style: a list of {role, content}
    ALPACA = "alpaca"  # instruction / input / output, optional system and history
    SHAREGPT = "sharegpt"  # conversations of {from, value} (any tags)
    PREFERENCE = "preference"  # prompt or conversation + chosen + rejected
    KTO = "kto"  # prompt or conversation + completion + boolean label
    TEXT = "text"  # raw text (or chat turns) for continual pre-training


# Formats that all become one conversation per record (SFT trains on them; pre-training takes them too).
CHAT_FORMATS = (DatasetFormat.MESSAGES, DatasetFormat.ALPACA, DatasetFormat.SHAREGPT)


class OnError(str, Enum):
    FAIL = "fail"  # report every bad record (file and record), exit 2
    SKIP = "skip"  # drop bad records, report counts by reason


class MixStrategy(str, Enum):
    """How ``dataset.mix`` entries' training records are combined (LLaMA-Factory's ``mix_strategy``)."""

    CONCAT = "concat"  # every record of every entry, once
    INTERLEAVE_UNDER = "interleave_under"  # sampled by weight until the first entry runs out
    INTERLEAVE_OVER = "interleave_over"  # sampled by weight until every entry is used up (repeats)


class ChatTemplate(str, Enum):
    CHATML = "chatml"
    CPM4 = "cpm4"  # MiniCPM 4: ChatML after the BOS token


class ToolFormat(str, Enum):
    """How chatml/cpm4 write the offered tools and the calls (LLaMA-Factory's ``tool_format``)."""

    DEFAULT = "default"  # LLaMA-Factory's, as its chatml and cpm4 templates write them
    QWEN = "qwen"  # Qwen 2.5 / Hermes-style <tools> and <tool_call> JSON


class DpoLoss(str, Enum):
    SIGMOID = "sigmoid"
    IPO = "ipo"
    HINGE = "hinge"  # SLiC's relu(1 - beta * margin) (LLaMA-Factory's pref_loss: hinge)


class WandbMode(str, Enum):
    AUTO = "auto"  # online when an API key and the network are there, else offline
    ONLINE = "online"
    OFFLINE = "offline"


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
    # Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy).
    liger: LigerMode = LigerMode.AUTO


@dataclass
class FullMethod:
    """Full-parameter fine-tuning: every weight trains."""

    name: Literal["full"] = "full"


@dataclass
class LoraMethod:
    """peft LoRA adapters on the model's projections."""

    name: Literal["lora"] = "lora"
    r: int = 16
    alpha: int | None = None  # None: 2 × r (LLaMA-Factory's default, so a ported lora_rank keeps its scale)
    dropout: float = 0.05
    # None: the model config's ``lora_target_modules``, else every linear layer but the head. One
    # name holding a regex character (``.*(q|v)_proj``) is peft's regex over whole module names.
    target_modules: list[str] | None = None
    init: LoraInit = LoraInit.DEFAULT
    use_rslora: bool = False  # scale alpha / sqrt(r), not alpha / r (rank-stabilised LoRA)
    use_dora: bool = False  # weight-decomposed LoRA (a trained magnitude per output feature)
    # Modules trained whole and saved with the adapter (LLaMA-Factory's additional_target): the
    # embeddings and head after adding tokens.
    modules_to_save: list[str] | None = None


MethodConfig = FullMethod | LoraMethod


@dataclass
class SftStage:
    """Supervised fine-tuning on chat data, loss on assistant turns only."""

    name: Literal["sft"] = "sft"


@dataclass
class PretrainStage:
    """Continual pre-training: text packed into ``dataset.cutoff_len`` blocks, loss on every token."""

    name: Literal["pretrain"] = "pretrain"


@dataclass
class DpoStage:
    """Direct preference optimisation (TRL's DPOTrainer) on chosen/rejected pairs."""

    name: Literal["dpo"] = "dpo"
    beta: float = 0.1
    loss_type: DpoLoss = DpoLoss.SIGMOID
    label_smoothing: float = 0.0


@dataclass
class KtoStage:
    """Kahneman-Tversky optimisation (TRL's KTOTrainer) on completions labelled good or bad."""

    name: Literal["kto"] = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


StageConfig = SftStage | PretrainStage | DpoStage | KtoStage


@dataclass
class DatasetColumns:
    """Field names in the files, as in LLaMA-Factory's ``dataset_info.json`` ``columns``.

    null: the format's default (TRL's names: ``messages``; ``prompt``/``chosen``/``rejected``;
    ``prompt``/``completion``/``label``; ``text``; alpaca: ``instruction``/``input``/``output``).
    """

    messages: str | None = None
    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    system: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    kto_tag: str | None = None
    text: str | None = None
    # Function schemas offered to the model (a JSON list, or its text), for tool-call SFT, DPO and KTO.
    tools: str | None = None


@dataclass
class DatasetTags:
    """Role and content keys inside messages, as in ``dataset_info.json`` ``tags``.

    null: ``from``/``value``/``human``/``gpt``/``system`` for sharegpt, else
    ``role``/``content``/``user``/``assistant``/``system``.
    """

    role_tag: str | None = None
    content_tag: str | None = None
    user_tag: str | None = None
    assistant_tag: str | None = None
    system_tag: str | None = None
    # Tool calls: an assistant turn whose content is the call's JSON ({"name", "arguments"}, or a
    # list of them); observation: a tool's result. Defaults: function_call / observation
    # (LLaMA-Factory), and tool for the messages format's observations.
    function_tag: str | None = None
    observation_tag: str | None = None


@dataclass
class DatasetSource:
    """Another data set whose records join this one (``dataset.mix``).

    Written by sala-train from that entry's ``conf/dataset`` file when the run is configured, so
    ``config.yaml`` records exactly which files were read and how; not meant to be set by hand.
    """

    name: str
    train: list[str]
    format: DatasetFormat = DatasetFormat.MESSAGES
    columns: DatasetColumns = field(default_factory=DatasetColumns)
    tags: DatasetTags = field(default_factory=DatasetTags)
    validation: list[str] | None = None
    test: list[str] | None = None
    max_samples: int | None = None


@dataclass
class DatasetConfig:
    """Where the data lives and how it is cut. Paths are relative to the launch directory."""

    name: str
    train: list[str]
    format: DatasetFormat = DatasetFormat.MESSAGES
    columns: DatasetColumns = field(default_factory=DatasetColumns)
    tags: DatasetTags = field(default_factory=DatasetTags)
    # null: the tokenizer's own chat template; chatml / cpm4 for tokenizers without one.
    template: ChatTemplate | None = None
    # chatml / cpm4 only: how tools and calls are written; null: default (as LLaMA-Factory's cpm4).
    tool_format: ToolFormat | None = None
    # A system prompt for each conversation without one of its own (LLaMA-Factory's default_system);
    # null: none, or what the chat template writes by itself.
    default_system: str | None = None
    # Train on prompt tokens too (LLaMA-Factory's train_on_prompt).
    train_on_prompt: bool = False
    # Train only the last assistant turn of each conversation.
    mask_history: bool = False
    on_error: OnError = OnError.FAIL
    validation: list[str] | None = None
    test: list[str] | None = None
    # Fraction (0 < x < 1) or count (>= 1) of train split off as validation.
    val_size: float | None = None
    cutoff_len: int = 2048
    max_samples: int | None = None
    split_seed: int = 42
    # Processes that convert a file's records and tokenize a split (LLaMA-Factory's
    # preprocessing_num_workers); null: one per usable core, at most 16, each with 2,000 records or
    # more (fewer: one process). The run's applies to a mix's entries (it changes no sample, so an
    # entry's own is not warned of).
    preprocessing_num_workers: int | None = None
    # Other conf/dataset entries mixed in (LLaMA-Factory's ``dataset: a,b``): each keeps its own
    # files, format, columns, tags and max_samples (null: this entry's, as LLaMA-Factory caps each
    # data set); this entry's cutoff, template, masking, on_error and validation split apply to all.
    mix: list[str] = field(default_factory=list)
    mix_strategy: MixStrategy = MixStrategy.CONCAT
    # Interleaving weights, this entry's first then each of ``mix``; null: equal weights.
    interleave_probs: list[float] | None = None
    mixed: list[DatasetSource] = field(default_factory=list)  # filled from ``mix`` by sala-train


@dataclass
class SingleBackend:
    """One process on one device (GPU if present, else CPU)."""

    name: Literal["single"] = "single"


@dataclass
class DdpBackend:
    """Data parallel: a full model copy per process, gradients all-reduced (NCCL, or gloo on CPU)."""

    name: Literal["ddp"] = "ddp"
    find_unused_parameters: bool = False


@dataclass
class Zero2Backend:
    """DeepSpeed ZeRO stage 2: optimizer states and gradients sharded across processes."""

    name: Literal["zero2"] = "zero2"
    offload_optimizer: bool = False
    overlap_comm: bool = True


@dataclass
class Zero3Backend:
    """DeepSpeed ZeRO stage 3: parameters sharded too; 16-bit weights gathered on save."""

    name: Literal["zero3"] = "zero3"
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True


@dataclass
class Zero3OffloadBackend(Zero3Backend):
    """ZeRO-3 with optimizer states and parameters offloaded to CPU memory."""

    name: Literal["zero3_offload"] = "zero3_offload"  # type: ignore[assignment]
    offload_optimizer: bool = True
    offload_param: bool = True


@dataclass
class FsdpBackend:
    """PyTorch FSDP (FSDP2 by default), wrapping each transformer layer; CUDA only."""

    name: Literal["fsdp"] = "fsdp"
    version: int = 2
    cpu_offload: bool = False
    # Sharded checkpoints while training (fast, resumable); final/ always holds a full model.
    sharded_checkpoints: bool = True


@dataclass
class FsdpMultinodeBackend(FsdpBackend):
    """FSDP across several nodes (launcher=multinode or slurm with launcher.nnodes > 1)."""

    name: Literal["fsdp_multinode"] = "fsdp_multinode"  # type: ignore[assignment]


BackendConfig = (
    SingleBackend | DdpBackend | Zero2Backend | Zero3Backend | Zero3OffloadBackend | FsdpBackend | FsdpMultinodeBackend
)
DeepSpeedBackend = Zero2Backend | Zero3Backend
DistributedBackend = DdpBackend | Zero2Backend | Zero3Backend | FsdpBackend


@dataclass
class LocalLauncher:
    """This machine: one process, or torchrun standalone with ``nproc_per_node`` workers."""

    name: Literal["local"] = "local"
    # null: every GPU this machine has (1 without GPUs).
    nproc_per_node: int | None = None
    dry_run: bool = False
    gpu_memory_gib: float | None = None
    cpu_memory_gib: float | None = None


@dataclass
class MultinodeLauncher:
    """The same command on every node; torchrun's c10d rendezvous on ``master_addr:master_port``."""

    name: Literal["multinode"] = "multinode"
    nnodes: int = 2
    node_rank: int = 0
    nproc_per_node: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    dry_run: bool = False
    gpu_memory_gib: float | None = None
    cpu_memory_gib: float | None = None


@dataclass
class SlurmLauncher:
    """A batch job (sbatch): one torchrun per node, rendezvous from SLURM's environment."""

    name: Literal["slurm"] = "slurm"
    nnodes: int = 1
    gpus_per_node: int = 0
    # null: gpus_per_node, or 1 without GPUs.
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    job_name: str = "sala-train"
    extra_sbatch: list[str] = field(default_factory=list)
    # Seconds before the time limit (or preemption) at which SLURM warns the job to checkpoint.
    signal_seconds: int = 120
    requeue: bool = True
    wait: bool = False
    dry_run: bool = False
    gpu_memory_gib: float | None = None
    cpu_memory_gib: float | None = None


LauncherConfig = LocalLauncher | MultinodeLauncher | SlurmLauncher


@dataclass
class NoLogger:
    """Metrics go to ``metrics.jsonl`` and ``loss.png`` only (always written)."""

    name: Literal["none"] = "none"


@dataclass
class TensorboardLogger:
    """Event files under ``RUN_DIR/tensorboard`` (plus the resolved config as text)."""

    name: Literal["tensorboard"] = "tensorboard"


@dataclass
class WandbLogger:
    """Weights & Biases; the run folder lives under ``RUN_DIR/wandb``. API keys come from the
    environment or ``wandb login``, never from this config."""

    name: Literal["wandb"] = "wandb"
    project: str = "sala-train"
    entity: str | None = None
    # null: the sweep directory's name in a multirun, else no group.
    group: str | None = None
    # null: the run's overrides (``key=value,...``), else the run directory's name.
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.AUTO


LoggerConfig = NoLogger | TensorboardLogger | WandbLogger


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; mapped onto TrainingArguments in one function."""

    max_steps: int = -1
    num_train_epochs: float = 3.0
    learning_rate: float = 5e-5
    lr_scheduler_type: SchedulerType = SchedulerType.LINEAR
    # Where cosine_with_min_lr ends, a share of learning_rate (LLaMA-Factory's
    # lr_scheduler_kwargs.min_lr_rate); only with that schedule.
    min_lr_rate: float | None = None
    warmup_steps: int = 0
    # Warm-up as a share of the total steps (LLaMA-Factory's warmup_ratio); excludes warmup_steps.
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    # AdamW's moment decay rates and denominator term (TrainingArguments' names and defaults).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    eval_steps: int = 100
    eval_strategy: EvalStrategy = EvalStrategy.STEPS
    # Evaluate before the first step too, so the curve shows where training started.
    eval_on_start: bool = False
    save_steps: int = 500
    save_strategy: SaveStrategy = SaveStrategy.STEPS
    save_total_limit: int | None = None
    # final/ from the checkpoint whose eval (at its step) scored best, not from the last step; that
    # checkpoint is kept through pruning. Needs save_steps a multiple of eval_steps.
    load_best_model_at_end: bool = False
    # The eval figure that decides it: loss (every stage; lower is better), or for stage=dpo
    # rewards/accuracies or rewards/margins, for stage=kto rewards/margins (higher is better).
    metric_for_best_model: str = "loss"
    # Stop once this many checkpoint evaluations in a row have not bettered the best (with
    # load_best_model_at_end, so final/ is the best).
    early_stopping_patience: int | None = None
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # "auto": continue from the newest checkpoint in the run directory; "never": start fresh
    # (refused if checkpoints exist); or a path to one checkpoint directory.
    resume: str = "auto"
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    # Padding-free batches: samples end to end, positions restarting (refused for models that leak).
    packing: bool = False
    # Token budget per device batch (replaces per_device_train_batch_size when set): packed tokens,
    # or padded tokens (longest x samples) without packing.
    max_tokens_per_batch: int | None = None
    # Padded batches of similar lengths (less padding); packing makes it unnecessary.
    group_by_length: bool = False
    # A padded batch's width rounded up to a multiple of this (within dataset.cutoff_len and the
    # model's positions). On a GPU, sdpa pays for each batch shape it meets first (about 0.15 s a pass
    # measured on an H100): rounding bounds the shapes. null: 64 on a CUDA GPU with sdpa attention and
    # fixed-size batches (not under max_tokens_per_batch, whose groups it would decide); else none.
    pad_to_multiple_of: int | None = None
    # NEFTune: uniform noise on the input embeddings while training, alpha / sqrt(length * width)
    # by each sample's own length (stage=sft and pretrain; e.g. 5).
    neftune_noise_alpha: float | None = None


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
    logger: LoggerConfig = field(default_factory=NoLogger)


@dataclass
class DataToolConfig(RunConfig):
    """``sala-data``: the training config plus what to show."""

    preview: int = 0
    preview_format: PreviewFormat = PreviewFormat.TEXT
