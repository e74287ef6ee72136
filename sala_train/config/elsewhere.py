"""What other fine-tuning tools call a setting (LLaMA-Factory's flat YAML keys, peft's and the
Trainer's names), for the "unknown key" message: the key sala-train reads instead, or that it does
not offer the feature and why. A ported config otherwise met bare refusals that read like typos,
or a nearest spelling that pointed the wrong way (``eval_strategy`` is no ``save_strategy``,
``disable_gradient_checkpointing`` is ``gradient_checkpointing`` inverted).

Written by hand: no library maps one tool's option names onto another's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Renamed:
    """The same setting under another name: ``to`` is sala-train's (a key path or an override);
    ``note`` says how the value changes, if it does."""

    to: str
    note: str = ""
    tool: str = "LLaMA-Factory"


@dataclass(frozen=True)
class NotOffered:
    """A feature sala-train does not have; ``why`` says so and what to do instead."""

    why: str
    tool: str = "LLaMA-Factory"


Elsewhere = Renamed | NotOffered

_TOKENS = "add the tokens to a saved copy of the model and its tokenizer, then train that (README, Troubleshooting)"

# Keys by their name elsewhere (LLaMA-Factory's unless noted). Names sala-train shares with them
# (learning_rate, cutoff_len, template, ...) need no entry: a key given in the wrong place is found
# by name among sala-train's own (``same_name_elsewhere``).
NAMES_ELSEWHERE: dict[str, Elsewhere] = {
    # model
    "model_name_or_path": Renamed("model.name_or_path"),
    "model_revision": Renamed("model.revision"),
    "flash_attn": Renamed("model.attn_implementation", "fa2 is flash_attention_2; also sdpa, eager, sala_varlen"),
    "enable_liger_kernel": Renamed("model.liger", "auto, true or false; auto: on where it is known right, on CUDA"),
    "train_from_scratch": Renamed("model.from_scratch"),
    "infer_dtype": Renamed("model.dtype"),
    "torch_dtype": Renamed("model.dtype", tool="transformers"),
    "quantization_bit": NotOffered("QLoRA (a quantized base) is not offered: the base loads in model.dtype"),
    "quantization_method": NotOffered("QLoRA (a quantized base) is not offered: the base loads in model.dtype"),
    "double_quantization": NotOffered("QLoRA (a quantized base) is not offered: the base loads in model.dtype"),
    "rope_scaling": NotOffered("not offered: set rope_scaling in the model's own config.json, in a copy of the model"),
    "use_unsloth": NotOffered("Unsloth is not offered; Liger's kernels are (model.liger)"),
    "use_unsloth_gc": NotOffered("Unsloth is not offered; train.gradient_checkpointing is"),
    "resize_vocab": NotOffered(f"not offered: {_TOKENS}"),
    "new_special_tokens": NotOffered(f"not offered: {_TOKENS}"),
    "add_tokens": NotOffered(f"not offered: {_TOKENS}"),
    "add_special_tokens": NotOffered(f"not offered: {_TOKENS}"),
    "adapter_name_or_path": NotOffered(
        "not offered: merge the adapter into its base with sala-export, then train from the merged model"
    ),
    # method
    "finetuning_type": Renamed("method", "method=lora or method=full; freeze and oft are not offered"),
    "lora_rank": Renamed("method.r", "with method=lora"),
    "lora_alpha": Renamed("method.alpha", "with method=lora"),
    "lora_dropout": Renamed("method.dropout", "with method=lora"),
    "lora_target": Renamed("method.target_modules", "with method=lora; all is all-linear"),
    "additional_target": Renamed("method.modules_to_save", "with method=lora"),
    "init_lora_weights": Renamed("method.init", "with method=lora", tool="peft"),
    "pissa_init": NotOffered("not offered (it rewrites the base weights the adapter is merged into)"),
    "loraplus_lr_ratio": NotOffered("LoRA+ is not offered (it needs its own optimizer)"),
    "freeze_trainable_layers": NotOffered("freeze tuning is not offered: method=lora or method=full"),
    "freeze_trainable_modules": NotOffered("freeze tuning is not offered: method=lora or method=full"),
    "pref_beta": Renamed("stage.beta", "with stage=dpo or stage=kto"),
    "pref_loss": Renamed("stage.loss_type", "with stage=dpo: sigmoid, ipo or hinge; orpo and simpo are not offered"),
    "dpo_label_smoothing": Renamed("stage.label_smoothing", "with stage=dpo"),
    "kto_chosen_weight": Renamed("stage.desirable_weight", "with stage=kto"),
    "kto_rejected_weight": Renamed("stage.undesirable_weight", "with stage=kto"),
    "pref_ftx": NotOffered("an SFT term in the preference loss is not offered"),
    "ref_model": NotOffered("not offered: the reference is the model the run starts from"),
    # data
    "dataset_dir": NotOffered(
        "not needed: a data set is a conf/dataset entry (your own with --config-dir conf) naming its files"
    ),
    "eval_dataset": Renamed("dataset.validation", "its files, not an entry's name"),
    "streaming": NotOffered("not offered: the data is tokenized once, in several processes, and cached"),
    "buffer_size": NotOffered("not offered: the data is tokenized once, in several processes, and cached"),
    "tokenized_path": NotOffered("not needed: the tokenized data is cached and reused while its files are unchanged"),
    "overwrite_cache": NotOffered("not needed: the cache follows the files, edits included"),
    # train
    "output_dir": Renamed("hydra.run.dir"),
    "overwrite_output_dir": NotOffered(
        "not needed: the same command resumes its run directory; train.resume=never refuses one with checkpoints"
    ),
    "resume_from_checkpoint": Renamed("train.resume", "auto, never, or a checkpoint's path"),
    "deepspeed": Renamed("backend", "backend=zero2, zero3 or zero3_offload: the DeepSpeed config is generated"),
    "fsdp": Renamed("backend", "backend=fsdp or fsdp_multinode"),
    "report_to": Renamed("logger", "logger=tensorboard or logger=wandb"),
    "logging_dir": NotOffered("not needed: trackers write under the run directory"),
    "plot_loss": NotOffered("not needed: loss.png is always drawn"),
    "do_train": NotOffered("not needed: sala-train trains; sala-data only prepares and shows the data"),
    "do_eval": NotOffered("not needed: the validation set is always evaluated (train.eval_strategy)"),
    "evaluation_strategy": Renamed("train.eval_strategy", tool="transformers"),
    "disable_gradient_checkpointing": Renamed(
        "train.gradient_checkpointing", "the opposite: disable_gradient_checkpointing=true is false there"
    ),
    "lr_scheduler_kwargs": Renamed(
        "train.min_lr_rate", "with train.lr_scheduler_type=cosine_with_min_lr; other kwargs are not offered"
    ),
    "neat_packing": Renamed("train.packing", "sala-train's packing never attends across samples"),
    "optim": NotOffered(
        "not offered: AdamW (torch's fused) on every backend; its betas and epsilon are "
        "train.adam_beta1, train.adam_beta2, train.adam_epsilon"
    ),
    # (load_best_model_at_end and metric_for_best_model: train.* of the same names, found by name)
    "greater_is_better": NotOffered(
        "not needed: it follows train.metric_for_best_model (a loss lower, rewards/* higher)"
    ),
    "early_stopping_steps": Renamed("train.early_stopping_patience", "counted in checkpoints"),
    "save_only_model": NotOffered("not offered: a checkpoint keeps its optimizer state, to resume exactly"),
    "ddp_timeout": NotOffered(
        "not needed: every process has its data before the first collective call (torch's timeout applies)"
    ),
    "do_predict": NotOffered("generating is not offered: a test set (dataset.test) is scored by its loss"),
    "predict_with_generate": NotOffered("generating is not offered: a test set (dataset.test) is scored by its loss"),
    "use_galore": NotOffered("GaLore is not offered"),
    "use_badam": NotOffered("BAdam is not offered"),
    "use_apollo": NotOffered("APOLLO is not offered"),
}


def explain(key: str) -> str | None:
    """The phrase the "unknown key" message gives for ``key`` when another tool names it so."""
    found = NAMES_ELSEWHERE.get(key)
    if isinstance(found, Renamed):
        return f"{_owned(found.tool)} {key} is {found.to}" + (f" ({found.note})" if found.note else "")
    if isinstance(found, NotOffered):
        return f"{_owned(found.tool)} {key}: {found.why}"
    return None


# What a value another tool accepts means here, by the enum that refuses it (its class name).
_VALUES_ELSEWHERE = {
    "ChatTemplate": "LLaMA-Factory's other template names are not read: null (the default) renders with the "
    "tokenizer's own chat template, as the model ships it (Llama 3's, Qwen's, ...); chatml and cpm4 are for "
    "tokenizers without one",
    "DpoLoss": "ORPO and SimPO are not offered (stage=kto trains KTO)",
}


def explain_value(enum_name: str) -> str | None:
    """The phrase an invalid value of the enum ``enum_name`` gets, when other tools offer more."""
    return _VALUES_ELSEWHERE.get(enum_name)


def _owned(tool: str) -> str:
    return f"{tool}'" if tool.endswith("s") else f"{tool}'s"  # (transformers' key, LLaMA-Factory's key)
