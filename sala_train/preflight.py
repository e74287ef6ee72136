"""Checks that need the tokenizer and the data, run once before anything heavy.

Every rank runs them before loading its model (``runner.prepare``). A launch of several processes
runs them first in the launcher, once: a data problem is then one message and exit code 2, instead
of one message per rank followed by torchrun's traceback and exit code 1, and the ranks find the
tokenized data in the ``datasets`` cache instead of each tokenizing it at the same time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sala_train.config.schema import DatasetFormat, ModelConfig, RunConfig
from sala_train.console import say
from sala_train.ranks import is_main_process

if TYPE_CHECKING:
    from sala_train.data.formats import LoadedSplit


def check_machine(cfg: RunConfig) -> None:
    """What this machine's hardware and libraries must offer."""
    from sala_train.distributed import refuse_unsupported
    from sala_train.kernels import check_liger_possible
    from sala_train.models import check_attention_available

    refuse_unsupported(cfg)
    check_attention_available(cfg.model)  # fail fast, before any download or tokenization
    check_liger_possible(cfg.model)


def read_data_files(cfg: RunConfig) -> dict[str, LoadedSplit]:
    """The data files read and every record checked: the commonest bad input, found in about a
    second, since it needs neither torch nor transformers (which take several to import)."""
    from sala_train.data.build import raw_splits

    return raw_splits(cfg.dataset)


def check_and_build_data(
    cfg: RunConfig, raw: dict[str, LoadedSplit] | None = None, quiet: bool = False
) -> tuple[Any, Any]:
    """Tokenizer and tokenized data, after the cheaper checks; user errors raise (exit code 2).
    ``raw``: what ``read_data_files`` returned, when the caller read the files first. ``quiet``:
    a check before the ranks start (the launcher's, a SLURM job's data step), whose rank 0 says
    the warnings: said there too, they came twice, or once per node."""
    raw = read_data_files(cfg) if raw is None else raw  # before importing what imports torch
    from sala_train.data.build import build_data, run_summary
    from sala_train.data.control_tokens import control_token_text_warning
    from sala_train.data.placeholders import unfilled_placeholders_warning
    from sala_train.methods import check_lora_targets
    from sala_train.models import load_tokenizer
    from sala_train.trackers import check_trackers

    check_machine(cfg)
    check_trackers(cfg)
    check_lora_targets(cfg.method, cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    speaks = is_main_process() and not quiet
    if speaks:
        if warning := slow_tokenizer_warning(tokenizer, cfg):
            say(warning)
        if warning := unfilled_placeholders_warning(raw["train"].records):
            say(f"sala-train: {warning}")
    data = build_data(cfg.stage, cfg.dataset, tokenizer, raw)
    check_samples_fit_positions(cfg.model, cfg.dataset.cutoff_len, data, tokenizer)
    check_best_metric_reported(cfg, data)
    if speaks:
        if warning := control_token_text_warning(raw["train"].records, tokenizer):
            say(f"sala-train: {warning}")
        for line in run_summary(data, cfg.dataset):
            say(f"sala-train: {line}")
    return tokenizer, data


def check_best_metric_reported(cfg: RunConfig, data: Any) -> None:
    """KTO's evaluation reports ``rewards/margins`` only from a validation split holding both
    desirable and undesirable samples: without both, ``train.metric_for_best_model=rewards/margins``
    failed at the first checkpoint's evaluation, that checkpoint unsaved."""
    from sala_train.config.best_metric import metric_name
    from sala_train.errors import DataError

    validation = data.splits.get("validation")
    if cfg.stage.name != "kto" or metric_name(cfg.train.metric_for_best_model) != "rewards/margins":
        return
    labels = set(validation["label"]) if validation is not None and "label" in validation.column_names else set()
    if len(labels) < 2:
        held = "only desirable" if True in labels else "only undesirable" if labels else "no"
        raise DataError(
            f"train.metric_for_best_model=rewards/margins: the validation split holds {held} samples, and KTO's "
            "margin is its desirable rewards less its undesirable ones; give a validation set with both, or "
            "train.metric_for_best_model=loss"
        )


def slow_tokenizer_warning(tokenizer: Any, cfg: RunConfig) -> str | None:
    """A slow (Python) tokenizer has no offsets, so conversations are tokenized piece by piece: a
    SentencePiece-style one then trains each reply with a leading space inference never shows
    (warned, not refused: a byte-level one is exact, and some models ship no fast tokenizer)."""
    if getattr(tokenizer, "is_fast", False) or cfg.dataset.format is DatasetFormat.TEXT:
        return None
    return (f"sala-train: WARNING: model.name_or_path={cfg.model.name_or_path} loads a slow tokenizer "
            f"({type(tokenizer).__name__}), without offsets: conversations are tokenized piece by piece, which "
            "for a SentencePiece-style tokenizer trains a space before every reply; a tokenizer.json (or the "
            "tokenizers package) gives the fast one")  # fmt: skip


def check_samples_fit_positions(model: ModelConfig, cutoff_len: int, data: Any, tokenizer: Any = None) -> Any:
    """A sample longer than the model's positions gets only a transformers warning, then trains on
    positions the model never learned (or fails inside the embedding): refuse it with the fix. The
    same for token ids past the model's embedding rows (``check_tokens_fit_vocab``). Returns the
    model's config it read (sala-data's padding figure reads its limits too)."""
    from transformers import AutoConfig

    from sala_train.errors import DataError, ModelLoadError, unloadable
    from sala_train.models import hub_kwargs, refuse_remote_code_not_trusted

    try:
        config = AutoConfig.from_pretrained(model.name_or_path, **hub_kwargs(model))
    except unloadable() as exc:
        refuse_remote_code_not_trusted(model, exc)
        raise ModelLoadError(f"model.name_or_path={model.name_or_path}: cannot load its config: {exc}") from exc
    check_tokens_fit_vocab(model, config, data, tokenizer)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    lengths = {name: max(stats.lengths) for name, stats in data.stats.items() if stats.lengths}
    too_long = {name: n for name, n in lengths.items() if isinstance(limit, int) and n > limit}
    if too_long:
        longest = ", ".join(f"{name} {n}" for name, n in too_long.items())
        raise DataError(
            f"dataset.cutoff_len={cutoff_len}: the longest sequences (tokens: {longest}) exceed the "
            f"{limit} positions of {model.name_or_path} (max_position_embeddings); set dataset.cutoff_len={limit}"
        )
    return config


def _largest_token_id(split: Any) -> int | None:
    """The largest token id in a tokenized split's id columns (``input_ids``; DPO's and KTO's
    ``prompt_ids``, ``chosen_ids``, ...), read by Arrow rather than row by row."""
    import pyarrow.compute as pc

    largest = None
    for column in split.column_names:
        if not column.endswith("_ids"):
            continue
        ids = pc.max(pc.list_flatten(split.with_format("arrow")[column])).as_py()
        if ids is not None and (largest is None or ids > largest):
            largest = ids
    return largest


def check_tokens_fit_vocab(model: ModelConfig, config: Any, data: Any, tokenizer: Any = None) -> None:
    """A token id past the model's embedding rows fails inside the embedding at the first step
    (``IndexError: index out of range in self``, or a CUDA assert): a tokenizer with more tokens
    than the model, or added tokens without resized embeddings. Refused with both sizes."""
    from sala_train.errors import ModelLoadError

    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int):
        return
    largest = {name: _largest_token_id(split) for name, split in data.splits.items()}
    beyond = [f"{name} {n}" for name, n in largest.items() if n is not None and n >= vocab]
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int) and pad >= vocab:  # padded positions go through the embedding too
        beyond.append(f"the padding token {pad}")
    if not beyond:
        return
    sized = f"the tokenizer has {len(tokenizer)} tokens and " if tokenizer is not None else ""
    raise ModelLoadError(
        f"model.name_or_path={model.name_or_path}: the model has vocab_size {vocab} (embedding rows for token ids "
        f"0 to {vocab - 1}), but {sized}the data uses ids past them (largest: {', '.join(beyond)}); use the "
        "model's own tokenizer, or resize the model's embeddings to the tokenizer "
        "(model.resize_token_embeddings(len(tokenizer))) and save the model"
    )
