"""Cross-field rules: combinations the schemas alone cannot reject.

Runs at compose time (parent process) before anything is loaded, so a user sees every problem
in one message. Each rule names the config keys involved.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from sala_train.config.best_metric import METRICS_BY_STAGE, metric_name
from sala_train.config.entries import mixed_sources
from sala_train.config.paths import home_expanded
from sala_train.config.schema import (
    CHAT_FORMATS,
    AttnImplementation,
    DatasetConfig,
    DatasetFormat,
    DatasetSource,
    DataToolConfig,
    DpoLoss,
    DpoStage,
    DType,
    EvalStrategy,
    FsdpBackend,
    FsdpMultinodeBackend,
    KtoStage,
    LigerMode,
    LoraMethod,
    MixStrategy,
    MultinodeLauncher,
    PretrainStage,
    RunConfig,
    SchedulerType,
    SftStage,
    SingleBackend,
    SlurmLauncher,
    StageConfig,
    TensorboardLogger,
    TrainConfig,
    WandbLogger,
    Zero2Backend,
    Zero3Backend,
)
from sala_train.config.typed import to_plain

# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds, or no limit.
_SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:unlimited|infinite)")


def slurm_seconds(limit: str) -> int | None:
    """A SLURM time limit (``_SLURM_TIME``'s forms) in seconds; None: none (UNLIMITED, INFINITE, 0)
    or not a time limit."""
    if not _SLURM_TIME.fullmatch(limit) or limit.isalpha():
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, secs = [*parts, 0, 0][:3]
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes, secs = [0, *parts, 0][:3] if len(parts) < 3 else parts
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + secs
    return total or None


_SLURM_MEM = re.compile(r"\d+([KMGTkmgt][Bb]?)?")  # sbatch --mem: megabytes unless a unit follows


# Flash attention computes in 16 bits only: float32 weights need the Trainer's autocast.
VARLEN_PRECISION = (
    "model.attn_implementation=sala_varlen computes in bfloat16/float16, and {weights} gives float32 weights; set "
    "train.bf16=true (float32 weights, bfloat16 compute) or model.dtype=bfloat16"
)


def check_run(cfg: RunConfig, base_dir: Path, run_dir: Path | None = None) -> list[str]:
    """Every cross-field problem of ``cfg``; paths resolve against ``base_dir``. ``run_dir``: the
    run directory, when known (a ``train.resume`` checkpoint it has started from is not checked
    again: the run continues from its own newest, and pruning may have removed the one named)."""
    sources, problems = mixed_sources(cfg.dataset)
    problems += _check_train(cfg, base_dir, run_dir)
    problems += _check_dataset(cfg, base_dir)
    problems += _check_mixed(cfg, sources, base_dir)
    problems += _check_model(cfg, base_dir)
    problems += _check_method(cfg)
    problems += _check_fsdp_lora_head(cfg, base_dir)
    problems += _check_liger_backend(cfg)
    problems += _check_backend_launcher(cfg)
    problems += _check_logger(cfg)
    problems += _check_stage_format(cfg)
    if isinstance(cfg, DataToolConfig) and cfg.preview < 0:
        problems.append(f"preview: the number of train samples to show, >= 0; got {cfg.preview}")
    return problems


SEED_LIMIT = 2**32


def _min_lr_problems(t: TrainConfig) -> list[str]:
    """``train.min_lr_rate`` with its schedule, and that schedule with it (transformers would fail
    at the first step without one, and every other schedule ignores it)."""
    with_min = t.lr_scheduler_type == SchedulerType.COSINE_WITH_MIN_LR
    if with_min and t.min_lr_rate is None:
        return ["train.lr_scheduler_type=cosine_with_min_lr: set train.min_lr_rate, the share of "
                "train.learning_rate it ends at (e.g. 0.1)"]  # fmt: skip
    if not with_min and t.min_lr_rate is not None:
        schedule = t.lr_scheduler_type.value
        return [f"train.min_lr_rate={t.min_lr_rate}: only train.lr_scheduler_type=cosine_with_min_lr ends at a "
                f"floor (this run's is {schedule}); set that schedule, or train.min_lr_rate=null"]  # fmt: skip
    if t.min_lr_rate is not None and not 0 <= t.min_lr_rate < 1:
        return [f"train.min_lr_rate: must be in [0, 1), got {t.min_lr_rate}"]
    return []


def _best_checkpoint_problems(cfg: RunConfig) -> list[str]:
    """``train.metric_for_best_model`` names a figure the stage's evaluation reports, and with
    ``train.load_best_model_at_end`` every checkpoint has an eval at its step to compare (the last
    step is always both)."""
    t = cfg.train
    offered = METRICS_BY_STAGE[cfg.stage.name]
    if metric_name(t.metric_for_best_model) not in offered:
        reports = f"{offered[0]} only" if len(offered) == 1 else f"{', '.join(offered)}; choose one"
        return [f"train.metric_for_best_model={t.metric_for_best_model}: stage={cfg.stage.name}'s evaluation "
                f"reports {reports}"]  # fmt: skip
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        return [f"train.early_stopping_patience: must be >= 1 or null, got {t.early_stopping_patience}"]
    if t.early_stopping_patience is not None and not t.load_best_model_at_end:
        return ["train.early_stopping_patience: needs train.load_best_model_at_end=true (stopped early, the last "
                "step's weights are those that stopped bettering; final/ should be the best checkpoint's)"]  # fmt: skip
    if not t.load_best_model_at_end:
        return []
    if t.eval_steps < 1 or t.save_steps < 1:
        return []  # (refused already)
    if t.save_strategy.value != t.eval_strategy.value:
        return [f"train.load_best_model_at_end / train.save_strategy={t.save_strategy.value} / train.eval_strategy="
                f"{t.eval_strategy.value}: checkpoints are compared by the evaluation at their step, so both must "
                f"be steps or both epoch (e.g. train.eval_strategy={t.save_strategy.value})"]  # fmt: skip
    if t.eval_strategy is EvalStrategy.EPOCH:
        if t.max_steps != -1:
            return [f"train.load_best_model_at_end / train.eval_strategy=epoch / train.max_steps={t.max_steps}: a run "
                    "that stops part-way through an epoch has no checkpoint of its last weights to compare; train "
                    "whole epochs with train.max_steps=-1"]  # fmt: skip
        return []
    if t.save_steps % t.eval_steps:
        multiple = t.save_steps - t.save_steps % t.eval_steps or t.eval_steps
        return [f"train.load_best_model_at_end / train.save_steps={t.save_steps} / train.eval_steps={t.eval_steps}: "
                "checkpoints are compared by the evaluation at their step, so train.save_steps must be a multiple "
                f"of train.eval_steps (e.g. train.save_steps={multiple})"]  # fmt: skip
    return []


def _check_train(cfg: RunConfig, base_dir: Path, run_dir: Path | None) -> list[str]:
    t = cfg.train
    problems = []
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
    ):
        if getattr(t, key) < 1:
            problems.append(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    if t.max_steps == 0 or t.max_steps < -1:  # the Trainer would train one step for 0
        problems.append(f"train.max_steps: a step count >= 1, or -1 to train num_train_epochs, got {t.max_steps}")
    elif t.max_steps == -1 and t.num_train_epochs <= 0:
        problems.append("train.max_steps / train.num_train_epochs: set max_steps > 0 or num_train_epochs > 0")
    if not 0 <= t.seed < SEED_LIMIT:  # numpy's range, which the Trainer seeds too
        problems.append(f"train.seed: must be in [0, 2**32), got {t.seed}")
    if t.learning_rate <= 0:
        problems.append(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    for beta in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, beta) < 1:
            problems.append(f"train.{beta}: must be in [0, 1), got {getattr(t, beta)}")
    if not t.adam_epsilon > 0:  # (0: a parameter whose gradient's moment is 0 divides by 0)
        problems.append(f"train.adam_epsilon: must be > 0, got {t.adam_epsilon}")
    problems += _min_lr_problems(t)
    problems += _best_checkpoint_problems(cfg)
    if t.max_grad_norm < 0:  # the Trainer would quietly not clip
        problems.append(f"train.max_grad_norm: must be >= 0 (0: no clipping), got {t.max_grad_norm}")
    if t.dataloader_num_workers < 0:
        problems.append(f"train.dataloader_num_workers: must be >= 0 (0: load in the training process), "
                        f"got {t.dataloader_num_workers}")  # fmt: skip
    if t.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    elif t.warmup_ratio is not None and t.warmup_steps != 0:
        problems.append(
            f"train.warmup_ratio={t.warmup_ratio} / train.warmup_steps={t.warmup_steps}: both set the warm-up; "
            "give one (train.warmup_steps=0 to use the ratio)"
        )
    if t.bf16 and t.fp16:
        problems.append("train.bf16 / train.fp16: choose one mixed-precision mode, not both")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        problems.append(f"train.save_total_limit: must be >= 1 or null, got {t.save_total_limit}")
    if t.max_tokens_per_batch is not None and t.max_tokens_per_batch < cfg.dataset.cutoff_len:
        problems.append(
            f"train.max_tokens_per_batch={t.max_tokens_per_batch}: must be >= dataset.cutoff_len "
            f"({cfg.dataset.cutoff_len}) so the longest sample fits a batch"
        )
    if t.group_by_length and (t.packing or t.max_tokens_per_batch is not None):
        problems.append(
            "train.group_by_length / train.packing / train.max_tokens_per_batch: length grouping is for "
            "padded batches of a fixed size; packing and token budgets make it unnecessary"
        )
    if t.pad_to_multiple_of is not None and t.pad_to_multiple_of < 1:
        problems.append(f"train.pad_to_multiple_of: must be >= 1 (1: each batch to its longest sample; null: "
                        f"64 on a GPU with sdpa), got {t.pad_to_multiple_of}")  # fmt: skip
    elif t.pad_to_multiple_of is not None and t.packing:
        problems.append(
            "train.pad_to_multiple_of / train.packing: the multiple rounds padded batches; packed batches are "
            "laid out by train.packing (leave train.pad_to_multiple_of null)"
        )
    if (t.packing or t.max_tokens_per_batch is not None) and isinstance(cfg.stage, DpoStage | KtoStage):
        problems.append(
            f"train.packing / train.max_tokens_per_batch: not available for stage={cfg.stage.name} "
            "(TRL's preference collators pad pairs themselves)"
        )
    if t.neftune_noise_alpha is not None and not t.neftune_noise_alpha > 0:
        problems.append(f"train.neftune_noise_alpha: must be > 0 (null: no noise), got {t.neftune_noise_alpha}")
    elif t.neftune_noise_alpha is not None and isinstance(cfg.stage, DpoStage | KtoStage):
        problems.append(
            f"train.neftune_noise_alpha: not available for stage={cfg.stage.name} (sala-train adds the noise to "
            "supervised and pre-training steps: TRL's preference trainers lay the batch out again inside their "
            "loss, and with LoRA their reference model is a frozen adapter on the same embeddings)"
        )
    if t.group_by_length and isinstance(cfg.stage, DpoStage | KtoStage):
        why = {
            "dpo": "its samples are prompt/chosen/rejected triples, which the Trainer cannot measure",
            "kto": "TRL pairs each KTO sample with its neighbours for the KL term, so the order must stay",
        }
        problems.append(f"train.group_by_length: not available for stage={cfg.stage.name} ({why[cfg.stage.name]})")
    if cfg.model.attn_implementation is AttnImplementation.SALA_VARLEN and not t.packing:
        problems.append(
            "model.attn_implementation=sala_varlen needs train.packing=true (it attends within packed samples), "
            "and a CUDA GPU"
        )
    float32_weights = cfg.model.dtype is DType.FLOAT32 or (cfg.model.dtype is DType.AUTO and cfg.model.from_scratch)
    if cfg.model.attn_implementation is AttnImplementation.SALA_VARLEN and float32_weights and not (t.bf16 or t.fp16):
        problems.append(VARLEN_PRECISION.format(weights="model.dtype=float32" if cfg.model.dtype is DType.FLOAT32
                                                else "model.from_scratch=true with model.dtype=auto"))  # fmt: skip
    resume = base_dir / Path(t.resume).expanduser()  # (as anchor_paths stores it; an absolute PATH stays)
    if t.resume not in ("auto", "never") and not (run_dir is not None and _continues_past(run_dir, resume)):
        from sala_train.checkpoints import MANIFEST, is_complete

        if not resume.is_dir():
            missing = "not a directory" if resume.exists() else "no such directory"
            problems.append(f"train.resume={t.resume}: {missing}; give 'auto', 'never' or a checkpoint directory")
        elif not is_complete(resume):
            # Checked here, before anything loads: the runner removes unpublished checkpoints, and
            # the Trainer fails on a directory without its states only after loading the model.
            problems.append(
                f"train.resume: {t.resume} is not a complete checkpoint ({MANIFEST} missing, or a file it "
                "lists is missing or cut short); name a checkpoint-N directory a run published"
            )
        elif (kind := _checkpoint_method(resume)) not in (None, cfg.method.name):
            problems.append(
                f"train.resume={t.resume} / method={cfg.method.name}: that checkpoint is of a method={kind} run "
                "(the Trainer would fail on it after loading the model); resume it with the method it was trained with"
            )
        elif shape := _another_model_shape(resume, cfg):
            problems.append(
                f"train.resume={t.resume} / model.name_or_path={cfg.model.name_or_path}: that checkpoint holds a "
                f"model of another shape ({shape}; the Trainer would fail on it after loading the model); "
                "resume with the model it was trained from"
            )
        elif changed := _fixed_by_the_checkpoint(resume, anchored(cfg, base_dir)):
            problems.append(
                f"train.resume={t.resume}: a resumed run keeps what its checkpoint holds, so these changes from the "
                "run that wrote it would not take effect (its optimizer and scheduler states carry the learning "
                "rate, weight decay and Adam's betas and epsilon; its adapter, the LoRA shape, scale and modules and "
                "the base model it adapts); resume with that run's values, or start a "
                "new run:" + "".join(f"\n      {c}" for c in changed)
            )
        elif changed := _data_order_changed_mid_epoch(resume, anchored(cfg, base_dir)):
            problems.append(
                f"train.resume={t.resume}: that checkpoint stopped part-way through an epoch, and the Trainer resumes "
                "by skipping as many batches as it trained, so a change to what decides the batches would train "
                "some of that epoch's samples twice and others never; resume with that run's values, or resume "
                "from a checkpoint at an epoch's end (train.save_strategy=epoch):"
                + "".join(f"\n      {c}" for c in changed)
            )
    return problems


def anchored(cfg: RunConfig, base_dir: Path) -> RunConfig:
    """``cfg`` with its paths absolute, as the run that wrote a checkpoint saved them in config.yaml
    (a relative data or model path on the command line was a change from itself)."""
    from sala_train.config.resolve import anchor_paths

    return anchor_paths(cfg, base_dir)


# What decides an epoch's batches: their order (the seed), their size, and the samples themselves
# (which records val_size holds out, and by which seed: the run's validation records were trained on).
DATA_ORDER_KEYS = ("train.seed", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
                   "train.max_tokens_per_batch", "train.packing", "train.group_by_length", "train.pad_to_multiple_of",
                   "dataset.train", "dataset.mix", "dataset.max_samples", "dataset.cutoff_len", "dataset.val_size",
                   "dataset.split_seed", "dataset.mix_strategy", "dataset.interleave_probs")  # fmt: skip


def _data_order_changed_mid_epoch(checkpoint: Path, cfg: RunConfig) -> list[str]:
    """``DATA_ORDER_KEYS`` that differ from the run that wrote ``checkpoint``, when it was saved
    part-way through an epoch; else nothing."""
    import yaml

    from sala_train.checkpoints import fixed_differences, part_way_through_an_epoch, run_record, with_current_defaults

    if not part_way_through_an_epoch(checkpoint):
        return []
    try:
        old = yaml.safe_load(run_record(checkpoint, "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    if not isinstance(old, dict):
        return []
    old = with_current_defaults(old)  # (a run from before a key existed had its default)
    new = to_plain(cfg)
    return fixed_differences(old, new, tuple(k for k in DATA_ORDER_KEYS if _applies(k, old, new)))


def _applies(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``key`` decides the training samples in either config: the split seed only where
    val_size splits (or mixes interleave), the mixing keys only where there is a mix, the padding
    multiple only where a token budget forms the batches."""
    data = [config.get("dataset") or {} for config in (old, new)]
    mixes = any(d.get("mix") for d in data)
    if key == "dataset.split_seed":
        return any(d.get("val_size") is not None for d in data) or (
            mixes and any(str(d.get("mix_strategy", "")).startswith("interleave") for d in data)
        )
    if key in ("dataset.mix_strategy", "dataset.interleave_probs"):
        return mixes
    if key == "train.pad_to_multiple_of":  # (it sizes padded token-budget groups only)
        return any((c.get("train") or {}).get("max_tokens_per_batch") is not None for c in (old, new))
    return True


def _continues_past(run_dir: Path, resume: Path) -> bool:
    """Whether this run, started from ``resume`` before, continues from a checkpoint of its own past
    it: then ``resume`` need not be there any more (pruned, moved), and the run's own config is what
    the command must match (``guard_run_dir``). Until then, the run resumes from ``resume`` itself."""
    from sala_train.checkpoints import continue_from

    return continue_from(run_dir, resume) != resume


# config.json keys that set a model's parameter shapes (those a full checkpoint's weights must match).
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim")  # fmt: skip


def _another_model_shape(checkpoint: Path, cfg: RunConfig) -> str:
    """How a full checkpoint's config.json and a local model's differ in ``SHAPE_KEYS`` ("" when
    they agree, or when either cannot be read: a hub id is not looked up here)."""

    def read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    saved, wanted = read(checkpoint / "config.json"), read(Path(cfg.model.name_or_path).expanduser() / "config.json")
    # (a null is a value the config class works out, such as head_dim: compared only when both are set)
    differ = [f"{key} {saved[key]} -> {wanted[key]}" for key in SHAPE_KEYS
              if saved.get(key) is not None and wanted.get(key) is not None and saved[key] != wanted[key]]  # fmt: skip
    return ", ".join(differ)


def _fixed_by_the_checkpoint(checkpoint: Path, cfg: RunConfig) -> list[str]:
    """The keys a checkpoint fixes (``FIXED_BY_CHECKPOINT``, and ``FIXED_BY_ADAPTER`` between LoRA
    runs) whose value differs from the config of the run that wrote ``checkpoint`` (its directory's
    config.yaml, kept in the checkpoint too; none to compare with: nothing)."""
    import yaml

    from sala_train.checkpoints import (
        FIXED_BY_ADAPTER,
        FIXED_BY_CHECKPOINT,
        fixed_differences,
        run_record,
        with_current_defaults,
    )

    try:
        old = yaml.safe_load(run_record(checkpoint, "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    if not isinstance(old, dict):
        return []
    old = with_current_defaults(old)  # (a run from before a key existed had its default: train.adam_beta1, ...)
    old_method = old.get("method")
    lora_both = isinstance(cfg.method, LoraMethod) and isinstance(old_method, dict) and old_method.get("r") is not None
    # (a full run has no LoRA shape to compare)
    keys: tuple[str, ...] = FIXED_BY_CHECKPOINT + FIXED_BY_ADAPTER if lora_both else FIXED_BY_CHECKPOINT
    old_model = old.get("model")
    if lora_both and (cfg.model.from_scratch or (isinstance(old_model, dict) and old_model.get("from_scratch"))):
        keys += BASE_FROM_THE_SEED
    new = to_plain(cfg)
    if lora_both:
        old, new = _as_adapted(old), _as_adapted(new)
    return fixed_differences(old, new, keys)


def _as_adapted(config: dict[str, Any]) -> dict[str, Any]:
    """A config with its LoRA targets as the adapter has them: ``method.target_modules``, else the
    model preset's ``model.lora_target_modules``, else all-linear, in one order (peft matches them
    as a set). The same adapter spelled by the other key, or in another order, is no change."""
    method, model = config.get("method"), config.get("model")
    if not isinstance(method, dict) or not isinstance(model, dict):
        return config
    targets = method.get("target_modules") or model.get("lora_target_modules") or ["all-linear"]
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, list):
        targets = sorted({"all-linear" if str(t).lower() in ("all-linear", "all") else str(t) for t in targets})
    r, alpha = method.get("r"), method.get("alpha")
    # (keys a newer sala-train added, absent from an older run's config: their defaults; a null alpha: 2 × r)
    adapted = {"target_modules": targets, "alpha": 2 * r if alpha is None and isinstance(r, int) else alpha,
               "use_rslora": bool(method.get("use_rslora")),
               "use_dora": bool(method.get("use_dora")),
               "modules_to_save": sorted(method.get("modules_to_save") or [])}  # fmt: skip
    return {**config, "method": {**method, **adapted}, "model": {**model, "lora_target_modules": None}}


# A base built from its config (model.from_scratch) has the weights train.seed draws: an adapter
# resumed with another seed (or onto a loaded base) would go on training on another model.
BASE_FROM_THE_SEED = ("model.from_scratch", "train.seed")


def _checkpoint_method(checkpoint: Path) -> str | None:
    """lora (an adapter), full (whole weights), or None where the files do not say (sharded states)."""
    if (checkpoint / "adapter_config.json").is_file():
        return "lora"
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return "full" if any((checkpoint / name).is_file() for name in weights) else None


def _check_dataset(cfg: RunConfig, base_dir: Path) -> list[str]:
    d = cfg.dataset
    problems = []
    if d.cutoff_len < 8:
        problems.append(f"dataset.cutoff_len: must be >= 8 tokens, got {d.cutoff_len}")
    if d.max_samples is not None and d.max_samples < 1:
        problems.append(f"dataset.max_samples: must be >= 1 or null, got {d.max_samples}")
    if d.preprocessing_num_workers is not None and d.preprocessing_num_workers < 1:
        problems.append(f"dataset.preprocessing_num_workers: must be >= 1 (1: tokenize in the command's own process) "
                        f"or null (one per core, for large splits), got {d.preprocessing_num_workers}")  # fmt: skip
    if not 0 <= d.split_seed < SEED_LIMIT:  # (numpy draws the split)
        problems.append(f"dataset.split_seed: must be in [0, 2**32), got {d.split_seed}")
    if d.validation and d.val_size is not None:
        problems.append("dataset.validation / dataset.val_size: give a validation file or a val_size, not both")
    if not d.validation and d.val_size is None:
        problems.append(
            "dataset.validation: a validation set is required; set dataset.validation=FILE or dataset.val_size=0.1"
        )
    if d.val_size is not None and not (0 < d.val_size < 1 or (d.val_size >= 1 and float(d.val_size).is_integer())):
        problems.append(f"dataset.val_size: a fraction in (0, 1) or a whole count >= 1, got {d.val_size}")
    if not d.train:
        problems.append("dataset.train: at least one training file is required")
    if d.mask_history and d.train_on_prompt:
        problems.append(
            "dataset.mask_history / dataset.train_on_prompt: choose one (LLaMA-Factory refuses them together too): "
            "mask_history trains only the last reply, train_on_prompt every token"
        )
    if d.tool_format is not None and d.template is None:
        problems.append(
            "dataset.tool_format: applies to dataset.template=chatml or cpm4; with dataset.template=null "
            "the tokenizer's own template writes tools its own way"
        )
    if d.default_system is not None and not d.default_system.strip():
        problems.append("dataset.default_system: blank; give the system prompt, or null for none")
    elif (d.default_system is not None and len(d.mixed) == len(d.mix)  # (the mix's formats read, if any)
          and all(f == DatasetFormat.TEXT for f in (d.format, *(m.format for m in d.mixed)))):  # fmt: skip
        problems.append(f"dataset.default_system: applies to conversations; dataset={d.name} holds text "
                        "(format text), which has no turns")  # fmt: skip
    problems += _column_problems("dataset", d)
    problems += _missing_files("dataset", d, base_dir)
    return problems


def _column_problems(key: str, files: DatasetConfig | DatasetSource) -> list[str]:
    """``columns`` keys the format never reads, which were ignored without a word."""
    from sala_train.data.records import unread_columns

    fmt = files.format.value
    problems = [f"{key}.columns.{column}={getattr(files.columns, column)}: {key}.format={fmt} does not read a "
                f"'{column}' column; map the field to one of the format's columns, or leave it null"
                for column in unread_columns(files)]  # fmt: skip
    if files.format is DatasetFormat.KTO and files.columns.completion and files.columns.response:
        problems.append(f"{key}.columns.completion / {key}.columns.response: both name the KTO reply (response is "
                        "LLaMA-Factory's name for it); give one")  # fmt: skip
    if files.format is DatasetFormat.TEXT and files.columns.text and files.columns.prompt:
        problems.append(f"{key}.columns.text / {key}.columns.prompt: both name the text column (prompt is "
                        "LLaMA-Factory's name for it); give one")  # fmt: skip
    return problems


def _missing_files(key: str, files: DatasetConfig | DatasetSource, base_dir: Path) -> list[str]:
    """A problem for every data path of ``files`` that is neither a file nor a directory."""
    problems = []
    for split in ("train", "validation", "test"):
        for i, name in enumerate(getattr(files, split, None) or []):
            path = base_dir / home_expanded(name)
            if path.exists() and not path.is_file() and not path.is_dir():  # (a named pipe, a device)
                problems.append(f"{key}.{split}[{i}]: not a regular file or directory: {path}")
            elif not path.is_file() and not path.is_dir():
                problems.append(f"{key}.{split}[{i}]: file not found: {path}")
    return problems


def _check_mixed(cfg: RunConfig, sources: list[DatasetSource], base_dir: Path) -> list[str]:
    """Entries of ``dataset.mix``: their files exist and the stage trains on their format."""
    d = cfg.dataset
    problems = []
    interleaved = d.mix_strategy is not MixStrategy.CONCAT
    if interleaved and not d.mix:
        problems.append(
            f"dataset.mix_strategy={d.mix_strategy.value}: there is nothing to interleave; list entries in dataset.mix"
        )
    if d.interleave_probs is not None:
        probs, wanted = d.interleave_probs, 1 + len(d.mix)
        if not interleaved:
            problems.append(
                "dataset.interleave_probs: weights need dataset.mix_strategy=interleave_under or interleave_over"
            )
        elif len(probs) != wanted:
            problems.append(
                f"dataset.interleave_probs: {len(probs)} weight(s) for {wanted} data sets "
                "(this entry first, then dataset.mix)"
            )
        elif min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            problems.append(f"dataset.interleave_probs: weights must be >= 0 and sum to 1, got {probs}")
        elif d.mix_strategy is MixStrategy.INTERLEAVE_OVER and min(probs) == 0:
            problems.append(
                f"dataset.interleave_probs: interleave_over samples until every data set is used up, so none may "
                f"have weight 0, got {probs}; drop that data set from dataset.mix or use interleave_under"
            )
    allowed = _stage_formats(cfg.stage)
    for source in sources:
        key = f"dataset.mix.{source.name}"
        if allowed is not None and source.format not in allowed:
            names = ", ".join(f.value for f in allowed)
            problems.append(
                f"{key}: format {source.format.value} cannot be mixed into stage={cfg.stage.name} ({names} only)"
            )
        problems += _column_problems(key, source)
        problems += _missing_files(key, source, base_dir)
    return problems


def _check_model(cfg: RunConfig, base_dir: Path) -> list[str]:
    m = cfg.model
    name = m.name_or_path
    if not name.strip():  # (it would name the current directory)
        return ["model.name_or_path: empty; give a hub id or a local model directory"]
    if not (name.startswith((".", "/", "~")) or (base_dir / name).exists()):
        return []  # a hub id
    local = base_dir / Path(name).expanduser()
    if not local.is_dir():
        if local.exists():
            return [f"model.name_or_path: {name} is a file, not a model directory (the folder with its config.json)"]
        return [f"model.name_or_path: local model directory not found: {name}"]
    if not (local / "config.json").is_file():
        # (transformers then blames a missing sentencepiece or tiktoken for the tokenizer it cannot find)
        return [f"model.name_or_path: {name} has no config.json: not a model directory"]
    # The JSON files transformers reads for the config and the tokenizer: its messages name none of
    # them ("Expecting value: line 2 column 1", blamed on the tokenizer), or are a traceback.
    problems = []
    if m.revision:  # (transformers ignores it for a directory: its own code and weights load, unpinned)
        problems.append(f"model.revision={m.revision}: model.name_or_path={name} is a local directory, whose own "
                        "files load whatever the revision; a revision pins a hub model's files: set "
                        "model.revision=null, or give the hub id")  # fmt: skip
    for file in MODEL_JSON_FILES:
        path = local / file
        try:
            stat = path.stat()
        except OSError:
            continue  # (absent: transformers does without it, or says what it misses)
        problems += _model_json_problems(str(path), stat.st_mtime_ns, stat.st_size)
    if not problems and not m.trust_remote_code and _runs_its_own_code(local / "config.json"):
        # (the runner refuses it too, after the data is tokenized; a dry run said nothing)
        problems.append(f"model.name_or_path={name}: its config.json names its own code (auto_map), which runs only "
                        "with model.trust_remote_code=true: read that code, then set it")  # fmt: skip
    return problems


def _runs_its_own_code(config_json: Path) -> bool:
    """A config.json whose ``auto_map`` names code of its own for a model type transformers has no
    code for (looked up among its installed model packages: importing its mapping imports torch)."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not isinstance(config.get("auto_map"), dict):
        return False
    model_type = config.get("model_type")
    spec = importlib.util.find_spec("transformers")
    if not isinstance(model_type, str) or spec is None or not spec.submodule_search_locations:
        return False
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    return models.is_dir() and not (models / model_type.replace("-", "_")).is_dir()


@functools.lru_cache(maxsize=32)
def _model_json_problems(name: str, mtime_ns: int, size: int) -> list[str]:
    """The problems of one of a model's JSON files (cached by its time and size: a sweep checks every
    job's config, and a tokenizer.json may be megabytes)."""
    path = Path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return [f"model.name_or_path: {path} cannot be read ({getattr(exc, 'strerror', None) or exc})"]
    except ValueError as exc:  # (json.JSONDecodeError: says the line and column)
        return [f"model.name_or_path: {path} is not valid JSON ({exc})"]
    if not isinstance(data, dict):  # (transformers: a TypeError or AttributeError traceback)
        return [f"model.name_or_path: {path} is not a JSON object"]
    if path.name == "config.json":
        return _config_dtype_problems(path, data)
    if path.name == "tokenizer_config.json":
        return _tokenizer_config_problems(path, data)
    return []


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _tokenizer_config_problems(path: Path, config: dict[str, Any]) -> list[str]:
    """Values transformers takes without a check and fails on later with a TypeError traceback: a
    special token that is no string (nor an added-token object), a model_max_length that is no number."""
    problems = [f"model.name_or_path: {path}: {key} is {config[key]!r}; a token is a string such as '</s>'"
                for key in SPECIAL_TOKEN_KEYS
                if config.get(key) is not None and not isinstance(config[key], str | dict)]  # fmt: skip
    length = config.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int | float)):
        problems.append(f"model.name_or_path: {path}: model_max_length is {length!r}; a number of tokens")
    return problems


# What transformers reads of a local model directory as JSON (tokenizer.json is a tokenizers file).
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.json")  # fmt: skip


# torch's dtype names (``getattr(torch, name)``), kept here so that the command-line check needs no
# torch import (seconds); tests/unit/test_config.py compares them with torch's.
TORCH_DTYPE_NAMES = frozenset(
    (
        "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "cdouble", "cfloat", "chalf",
        "complex128", "complex32", "complex64", "double", "float", "float16", "float32", "float4_e2m1fn_x2", "float64",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1",
        "int16", "int2", "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32", "qint8",
        "quint2x4", "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3", "uint32", "uint4", "uint5",
        "uint6", "uint64", "uint7", "uint8",
    )
)  # fmt: skip


def _config_dtype_problems(path: Path, config: dict[str, Any]) -> list[str]:
    """A ``torch_dtype``/``dtype`` in config.json that is no torch dtype (``bf16``): transformers'
    ``getattr(torch, ...)`` is an AttributeError traceback (from the tokenizer's loading, too)."""
    problems = []
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value != "auto" and value.removeprefix("torch.") not in TORCH_DTYPE_NAMES:
            problems.append(f"model.name_or_path: {path}: {key} {value!r} is not a torch dtype (such as "
                            "'bfloat16', 'float16' or 'float32')")  # fmt: skip
    return problems


def _check_method(cfg: RunConfig) -> list[str]:
    match cfg.method:
        case LoraMethod(r=r, alpha=alpha, dropout=dropout, target_modules=targets):
            problems = []
            if r < 1:
                problems.append(f"method.r: must be >= 1, got {r}")
            if alpha is not None and alpha < 1:
                problems.append(f"method.alpha: must be >= 1, got {alpha}")
            if cfg.method.modules_to_save is not None and not cfg.method.modules_to_save:
                problems.append("method.modules_to_save: empty list; use null for none")
            if not 0 <= dropout < 1:
                problems.append(f"method.dropout: must be in [0, 1), got {dropout}")
            if targets is not None and not targets:
                problems.append("method.target_modules: empty list; use null for the model's defaults")
            elif targets is None and cfg.model.lora_target_modules is not None and not cfg.model.lora_target_modules:
                # (an empty list read as none named: every linear layer, silently)
                problems.append("model.lora_target_modules: empty list; use null for every linear layer but the "
                                "output head (all-linear), or name the modules")  # fmt: skip
            return problems
        case _:
            return []


def _check_fsdp_lora_head(cfg: RunConfig, base_dir: Path) -> list[str]:
    """accelerate's FSDP loading (cpu_ram_efficient_loading) re-ties lm_head to the input embeddings
    after peft has wrapped lm_head, and fails there (KeyError: attribute 'weight' already exists)."""
    if not isinstance(cfg.backend, FsdpBackend) or not isinstance(cfg.method, LoraMethod):
        return []
    from sala_train.methods import lora_targets

    targets = lora_targets(cfg.method, cfg.model)  # (a list, or peft's all-linear, which leaves the head out)
    if not isinstance(targets, list) or "lm_head" not in targets:
        return []
    if not _ties_lm_head(cfg.model.name_or_path, base_dir, cfg.model.revision):
        return []
    kept = ",".join(t for t in targets if t != "lm_head")
    return [f"backend={cfg.backend.name} / LoRA on lm_head: this model ties lm_head to its input embeddings, and "
            f"FSDP's loading cannot re-tie a head LoRA has wrapped; set method.target_modules=[{kept}]"]  # fmt: skip


def _check_liger_backend(cfg: RunConfig) -> list[str]:
    """Liger's fused cross-entropy reads ``lm_head.weight`` without running ``lm_head``, where ZeRO-3
    gathers a module's weights; its weight gradient then fails DeepSpeed's backward (Liger-Kernel #1048,
    TRL #3368). ``auto`` leaves Liger off there (``kernels.use_liger``)."""
    if cfg.model.liger is LigerMode.TRUE and isinstance(cfg.backend, Zero3Backend):
        return [f"model.liger=true with backend={cfg.backend.name}: Liger's fused loss reads lm_head's weight, "
                "which ZeRO-3 keeps sharded outside lm_head's own forward; use model.liger=auto (off under "
                "ZeRO-3), or backend=fsdp"]  # fmt: skip
    return []


def _ties_lm_head(name_or_path: str, base_dir: Path, revision: str | None) -> bool:
    """Whether the model's config.json (a local directory's, or the Hugging Face cache's: nothing
    is downloaded to check) says it ties lm_head to its input embeddings. Unreadable: no refusal."""
    local = base_dir / Path(name_or_path).expanduser() / "config.json"
    path: object = local if local.is_file() else None
    if path is None and "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if not isinstance(path, str | Path):
        return False
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):  # (said by _check_model)
        return False
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _check_backend_launcher(cfg: RunConfig) -> list[str]:
    backend, launcher = cfg.backend, cfg.launcher
    problems = []
    procs = launcher.nproc_per_node
    if procs is not None and procs < 1:
        problems.append(f"launcher.nproc_per_node: must be >= 1 or null, got {procs}")
    for key in ("gpu_memory_gib", "cpu_memory_gib"):
        if (gib := getattr(launcher, key)) is not None and gib <= 0:
            problems.append(f"launcher.{key}: must be > 0 or null, got {gib}")
    nodes = 1
    match launcher:
        case MultinodeLauncher(nnodes=n, node_rank=rank, master_port=port, master_addr=addr):
            nodes = n
            if not addr or any(c.isspace() for c in addr):
                problems.append(f"launcher.master_addr: {addr!r} is not a host name or address; give node 0's "
                                "address, as the other nodes reach it")  # fmt: skip
            if n < 1:
                problems.append(f"launcher.nnodes: must be >= 1, got {n}")
            if not 0 <= rank < max(n, 1):
                problems.append(f"launcher.node_rank: must be in [0, {n - 1}] for launcher.nnodes={n}, got {rank}")
            if not 0 < port < 65536:
                problems.append(f"launcher.master_port: not a TCP port: {port}")
        case SlurmLauncher(nnodes=n, gpus_per_node=gpus, signal_seconds=warn, time=limit, mem=mem):
            nodes = n
            if mem is not None and not _SLURM_MEM.fullmatch(mem):
                problems.append(f"launcher.mem: {mem!r} is not a SLURM memory size; use a number with an "
                                "optional unit K, M (the default), G or T (64 GiB: 64G), or 0 for all of a node's "
                                "memory")  # fmt: skip
            if not _SLURM_TIME.fullmatch(limit):
                problems.append(f"launcher.time: {limit!r} is not a SLURM time limit; use minutes, MM:SS, HH:MM:SS, "
                                "D-HH, D-HH:MM or D-HH:MM:SS (48 hours: 2-00:00:00), or UNLIMITED")  # fmt: skip
            if n < 1:
                problems.append(f"launcher.nnodes: must be >= 1, got {n}")
            if gpus < 0:
                problems.append(f"launcher.gpus_per_node: must be >= 0, got {gpus}")
            if not 0 <= warn <= 65535:  # sbatch --signal's own limit
                problems.append(f"launcher.signal_seconds: must be in [0, 65535], got {warn}")
            elif warn and (seconds := slurm_seconds(limit)) is not None and seconds <= warn:
                problems.append(f"launcher.time={limit} / launcher.signal_seconds={warn}: the time limit is "
                                f"{seconds} s, so SLURM's warning would come as the job starts, and each run of it "
                                "would checkpoint and requeue before a step; give a longer launcher.time, or a "
                                "smaller launcher.signal_seconds")  # fmt: skip
            if launcher.cpus_per_task is not None and launcher.cpus_per_task < 1:
                problems.append(f"launcher.cpus_per_task: must be >= 1 or null, got {launcher.cpus_per_task}")
            if gpus > 0 and procs is not None and procs > gpus:
                problems.append(f"launcher.nproc_per_node={procs} / launcher.gpus_per_node={gpus}: one process per "
                                "GPU; the ranks past the node's GPUs would have none (leave nproc_per_node null "
                                "for one per GPU)")  # fmt: skip
            problems += _extra_sbatch_problems(launcher)
    match backend:
        case SingleBackend() if (procs or 1) > 1 or nodes > 1:
            asked = [f"launcher.nproc_per_node={procs}"] if (procs or 1) > 1 else []
            asked += [f"launcher.nnodes={nodes}"] if nodes > 1 else []
            problems.append(f"backend=single / {' '.join(asked)}: the single backend runs one process; choose "
                            "backend=ddp, zero2, zero3 or fsdp")  # fmt: skip
        case SingleBackend() if isinstance(launcher, SlurmLauncher) and launcher.gpus_per_node > 1:
            problems.append(f"backend=single / launcher.gpus_per_node={launcher.gpus_per_node}: the single backend "
                            "runs one process on one GPU, the others would sit idle; ask for "
                            "launcher.gpus_per_node=1, or choose backend=ddp, zero2, zero3 or fsdp")  # fmt: skip
        case FsdpMultinodeBackend() if nodes < 2:
            problems.append(
                "backend=fsdp_multinode spans nodes: use launcher=multinode or launcher=slurm with "
                "launcher.nnodes >= 2 (or backend=fsdp on one node)"
            )
        case FsdpBackend(version=version) if version not in (1, 2):
            problems.append(f"backend.version: FSDP is version 1 or 2, got {version}")
        case Zero2Backend() | Zero3Backend() if importlib.util.find_spec("deepspeed") is None:
            problems.append(f"backend={backend.name} needs DeepSpeed: pip install --no-build-isolation deepspeed")
    return problems


# sbatch options the launcher writes from its own keys (long and short spellings): given again in
# extra_sbatch they would override them behind the launcher's back (its log path, the signal its
# checkpoints hang on, one task per node for torchrun).
_MANAGED_SBATCH = {
    "--job-name": "launcher.job_name", "-J": "launcher.job_name", "--nodes": "launcher.nnodes",
    "-N": "launcher.nnodes", "--ntasks-per-node": None, "--ntasks": None, "-n": None, "--time": "launcher.time",
    "-t": "launcher.time", "--output": None, "-o": None, "--error": None, "-e": None, "--open-mode": None,
    "--signal": "launcher.signal_seconds", "--gpus-per-node": "launcher.gpus_per_node",
    "--cpus-per-task": "launcher.cpus_per_task", "-c": "launcher.cpus_per_task", "--mem": "launcher.mem",
    "--partition": "launcher.partition", "-p": "launcher.partition", "--account": "launcher.account",
    "-A": "launcher.account", "--requeue": "launcher.requeue", "--no-requeue": "launcher.requeue",
    "--wait": "launcher.wait", "-W": "launcher.wait",
}  # fmt: skip
# Options that clash with the launcher's own without being them: sbatch refuses the pair, or the
# job is not the one the launcher (and the dry run's memory check) planned.
_ARRAY_SBATCH = ("--array", "-a")  # every task would train in the one run directory at once
_MEMORY_SBATCH = ("--mem-per-cpu", "--mem-per-gpu")  # sbatch takes one of them and --mem
_GPU_SBATCH = ("--gpus", "-G", "--gpus-per-task")  # beside --gpus-per-node


def _extra_sbatch_problems(launcher: SlurmLauncher) -> list[str]:
    """Each item one option, written ``--name=value`` (a value may hold spaces: the directive is
    quoted, and sbatch reads the quotes), none of the launcher's own, and none that clashes with them."""
    problems = []
    for option in launcher.extra_sbatch:
        name = option.split("=", 1)[0]
        managed = name if name.startswith("--") else name[:2]  # (a short option's value may follow it: -t10)
        said = f"launcher.extra_sbatch: {option!r}"
        if not option.startswith("-") or any(c.isspace() for c in name):
            problems.append(f"{said} is not one sbatch option; write each as --name=value (e.g. --qos=high), one "
                            "list item each")  # fmt: skip
        elif managed in _MANAGED_SBATCH:
            key = _MANAGED_SBATCH[managed]
            instead = f"set {key}" if key else "sala-train sets it for torchrun and its logs"
            problems.append(f"{said} is the launcher's own option; {instead}")
        elif managed in _ARRAY_SBATCH:
            problems.append(f"{said}: each task of a job array would train in the one run directory at once; a sweep "
                            "(sala-train -m ... with values for a key) runs one job per run")  # fmt: skip
        elif managed in _MEMORY_SBATCH and launcher.mem:
            problems.append(f"{said}: launcher.mem={launcher.mem} sets --mem, and sbatch takes one of --mem, "
                            "--mem-per-cpu and --mem-per-gpu; set launcher.mem=null to give yours")  # fmt: skip
        elif managed in _GPU_SBATCH and launcher.gpus_per_node:
            problems.append(f"{said}: launcher.gpus_per_node={launcher.gpus_per_node} sets --gpus-per-node, the "
                            "GPUs torchrun gives its ranks on each node; set the count there")  # fmt: skip
    return problems


def _check_logger(cfg: RunConfig) -> list[str]:
    match cfg.logger:
        case TensorboardLogger() if importlib.util.find_spec("tensorboard") is None:
            return ["logger=tensorboard needs TensorBoard: pip install tensorboard (or, in the sala-train checkout, "
                    "pip install -e '.[tracking]')"]  # fmt: skip
        case WandbLogger() if importlib.util.find_spec("wandb") is None:
            return ["logger=wandb needs wandb: pip install wandb (or, in the sala-train checkout, pip install -e "
                    "'.[tracking]')"]  # fmt: skip
        case WandbLogger(project=project) if not project:
            return ["logger.project: a W&B project name is required"]
        case WandbLogger(project=project, tags=tags):
            # W&B's own limits, which wandb.init raised as a traceback after the model had loaded.
            problems = []
            bad = sorted(set(project) & set(_WANDB_PROJECT_FORBIDDEN))
            if bad or len(project) > 128:
                what = f"contains {' '.join(bad)}" if bad else "is longer than 128 characters"
                problems.append(f"logger.project={project!r}: a W&B project name {what}, which W&B refuses (the "
                                "entity, a team or user, goes in logger.entity)")  # fmt: skip
            problems += [f"logger.tags: {tag!r} is not a W&B tag (1 to 64 characters)" for tag in tags
                         if not 1 <= len(str(tag)) <= 64]  # fmt: skip
            return problems
    return []


_WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def _stage_formats(stage: StageConfig) -> tuple[DatasetFormat, ...] | None:
    """The data formats a stage trains on."""
    match stage:
        case SftStage():
            return CHAT_FORMATS
        case PretrainStage():
            return (DatasetFormat.TEXT, *CHAT_FORMATS)
        case DpoStage():
            return (DatasetFormat.PREFERENCE,)
        case KtoStage():
            return (DatasetFormat.KTO,)
    return None


def _check_stage_format(cfg: RunConfig) -> list[str]:
    fmt = cfg.dataset.format
    allowed = _stage_formats(cfg.stage)
    if allowed is None:
        return []
    problems = []
    if fmt not in allowed:
        names = ", ".join(f.value for f in allowed)
        stage = cfg.stage.name
        problems.append(f"stage={stage} / dataset.format={fmt.value}: stage {stage} trains on {names} data")
    d = cfg.dataset
    if (d.train_on_prompt or d.mask_history) and not isinstance(cfg.stage, SftStage):
        problems.append("dataset.train_on_prompt / dataset.mask_history: only stage=sft has prompt masks to change")
    if isinstance(cfg.stage, DpoStage | KtoStage) and isinstance(cfg.method, LoraMethod):
        from sala_train.methods import lora_targets

        targets = lora_targets(cfg.method, cfg.model)
        if isinstance(targets, list) and "lm_head" in targets:
            kept = ",".join(t for t in targets if t != "lm_head")
            problems.append(
                f"stage={cfg.stage.name} / LoRA on lm_head: TRL computes log-probabilities from lm_head.weight, so "
                f"an adapter there would never train; set method.target_modules=[{kept}]"
            )
    if isinstance(cfg.stage, DpoStage | KtoStage) and cfg.stage.beta <= 0:
        problems.append(f"stage.beta: must be > 0, got {cfg.stage.beta}")
    if isinstance(cfg.stage, DpoStage) and not 0 <= cfg.stage.label_smoothing < 0.5:
        problems.append(f"stage.label_smoothing: must be in [0, 0.5), got {cfg.stage.label_smoothing}")
    elif isinstance(cfg.stage, DpoStage) and cfg.stage.label_smoothing and cfg.stage.loss_type is not DpoLoss.SIGMOID:
        loss = cfg.stage.loss_type.value
        problems.append(  # TRL's IPO and hinge losses have no smoothing term: it would be ignored
            f"stage.label_smoothing={cfg.stage.label_smoothing} / stage.loss_type={loss}: label smoothing is for "
            f"the sigmoid loss (conservative DPO); the {'IPO' if loss == 'ipo' else loss} loss does not use it"
        )
    if isinstance(cfg.stage, KtoStage):
        weights = {"desirable_weight": cfg.stage.desirable_weight, "undesirable_weight": cfg.stage.undesirable_weight}
        problems += [f"stage.{key}: must be >= 0, got {value}" for key, value in weights.items() if value < 0]
        if all(value == 0 for value in weights.values()):
            problems.append("stage.desirable_weight / stage.undesirable_weight: both 0 leave nothing to train")
        if cfg.train.per_device_train_batch_size < 2:
            # TRL's KL estimate pairs each sample with another one of the same batch.
            problems.append(
                f"train.per_device_train_batch_size={cfg.train.per_device_train_batch_size}: stage=kto needs at "
                "least 2 samples per device batch (its KL term compares each sample with another in the batch)"
            )
    return problems
