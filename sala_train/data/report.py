"""``sala-data``: what the configured data becomes after tokenization, without training."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from sala_train.config.entries import mixed_settings_warning
from sala_train.config.schema import DataToolConfig, PretrainStage, PreviewFormat, SftStage
from sala_train.data.build import TokenizedData, build_data, raw_splits, row_lengths
from sala_train.data.chat import IGNORE_INDEX
from sala_train.data.control_tokens import control_token_text_warning
from sala_train.data.placeholders import unfilled_placeholders_warning
from sala_train.models import load_tokenizer
from sala_train.preflight import check_samples_fit_positions

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"


def _stats_lines(data: TokenizedData, padding: dict[str, str]) -> list[str]:
    lines = []
    for name, s in data.stats.items():
        dropped = sum(s.dropped.values())
        lines.append(f"{name}: {s.kept} samples kept, {dropped} dropped, {s.truncated} truncated")
        for reason, n in s.dropped.items():
            lines.append(f"  dropped {n}: {reason}")
        if s.left_out_tokens:
            lines.append(f"  left out {s.left_out_tokens} tokens: the partial last block of each 1000 documents")
        if s.kept:
            frac = s.trained_tokens / s.tokens
            # DPO feeds prompt+chosen and prompt+rejected as two sequences: mean and max are per sequence
            per = "sequence" if len(s.lengths) != s.kept else "sample"
            lines.append(
                f"  tokens {s.tokens} (per {per}: mean {s.tokens / len(s.lengths):.1f}, max {max(s.lengths)}), "
                f"trained {s.trained_tokens} ({frac:.1%}), padding {padding[name]}"
            )
    return lines


def _padding(cfg: DataToolConfig, tokenizer: Any, data: TokenizedData, text_config: Any) -> dict[str, str]:
    """Per split, the share of padding in the batches the run builds, and how it builds them.

    SFT and pre-training batches go through the run's own collator (``train.packing``,
    ``train.max_tokens_per_batch``, ``train.group_by_length``); DPO and KTO, whose trainers pad
    prompts and replies themselves, are estimated as rows padded to their longest, in file order.
    """
    from sala_train.data.collators import pair_padding_multiple

    t = cfg.train
    sizes = {name: t.per_device_train_batch_size if name == "train" else t.per_device_eval_batch_size
             for name in data.stats}  # fmt: skip
    if not isinstance(cfg.stage, SftStage | PretrainStage):
        pairs, _ = pair_padding_multiple(cfg, text_config)
        return {name: " ".join([f"{s.padding_fraction(sizes[name], pairs):.1%} in batches of {sizes[name]}",
                                *_rounding(pairs)]) for name, s in data.stats.items()}  # fmt: skip
    from sala_train.stages.sft import batch_collator, train_groups

    collate = batch_collator(cfg, tokenizer, text_config)
    packed = ["packed"] if t.packing else []
    rounded = _rounding(getattr(collate, "pad_to_multiple_of", None))
    out = {}
    for name, split in data.splits.items():
        lengths = row_lengths(split)
        if name == "train" and t.max_tokens_per_batch is not None:
            groups = train_groups(cfg, lengths, collate)
            how = " ".join([*packed, f"batches of at most {t.max_tokens_per_batch} tokens", *rounded])
        else:
            import torch

            order: list[int] = list(range(len(lengths)))  # evaluation reads its split in order
            grouped = name == "train" and t.group_by_length and not t.packing
            generator = torch.Generator().manual_seed(t.seed)
            if grouped:
                from transformers.trainer_pt_utils import get_length_grouped_indices

                order = get_length_grouped_indices(lengths, sizes[name], generator=generator)
            elif name == "train":
                # The Trainer's first epoch (accelerate's seedable sampler, seeded by train.seed);
                # file order gave 9% padding for a file sorted by length whose run padded 56%.
                order = torch.randperm(len(lengths), generator=generator).tolist()
            groups = [order[i : i + sizes[name]] for i in range(0, len(order), sizes[name])]
            how = " ".join([*(["length-grouped"] if grouped else []), *packed, f"batches of {sizes[name]}", *rounded])
        cells = sum(collate.cells([lengths[i] for i in group]) for group in groups)
        out[name] = f"{1 - sum(lengths) / cells:.1%} in {how}" if cells else f"0.0% in {how}"
    return out


def _rounding(multiple: int | None) -> list[str]:
    """What the padding figure's batches say of their rounding (``train.pad_to_multiple_of``)."""
    return [f"(widths rounded up to a multiple of {multiple})"] if multiple else []


def marked_text(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The sample as text with each trained span wrapped in [[ ]]."""
    out: list[str] = []
    run: list[int] = []
    trained = False
    for tok, label in [*zip(input_ids, labels, strict=True), (None, None)]:
        is_trained = label is not None and label != IGNORE_INDEX
        if tok is None or (run and is_trained != trained):
            text = tokenizer.decode(run)
            out.append(f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text)
            run = []
        if tok is not None:
            run.append(tok)
            trained = is_trained
    return "".join(out)


def show(cfg: DataToolConfig, out: TextIO = sys.stdout) -> None:
    raw = raw_splits(cfg.dataset)
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg.stage, cfg.dataset, tokenizer, raw)
    model_config = check_samples_fit_positions(
        cfg.model, cfg.dataset.cutoff_len, data, tokenizer
    )  # (refused as sala-train would)
    jsonl = cfg.preview_format is PreviewFormat.JSONL
    info = sys.stderr if jsonl else out
    if warning := unfilled_placeholders_warning(raw["train"].records):
        print(f"sala-data: {warning}", file=sys.stderr)
    if warning := mixed_settings_warning(cfg.dataset):
        print(f"sala-data: {warning}", file=sys.stderr)
    if warning := control_token_text_warning(raw["train"].records, tokenizer):
        print(f"sala-data: {warning}", file=sys.stderr)
    for line in _stats_lines(data, _padding(cfg, tokenizer, data, model_config.get_text_config())):
        print(line, file=info)
    if cfg.preview <= 0:
        return
    train = data.splits["train"]
    count = min(cfg.preview, len(train))
    if not jsonl:
        print(f"\n{count} train sample(s); trained spans in {TRAIN_OPEN} {TRAIN_CLOSE}:", file=out)
    for i in range(count):
        row = train[i]
        if jsonl:
            print(json.dumps({"split": "train", "index": i, **row}), file=out)
        elif "labels" in row:
            print(f"\n--- sample {i} ({len(row['input_ids'])} tokens) ---", file=out)
            print(marked_text(tokenizer, row["input_ids"], row["labels"]), file=out)
        else:  # dpo / kto: the prompt once, then each reply
            print(f"\n--- sample {i} ---", file=out)
            print(tokenizer.decode(row["prompt_ids"]), end="", file=out)
            for column in ("chosen_ids", "rejected_ids", "completion_ids"):
                if column in row:
                    reply = tokenizer.decode(row[column])
                    label = f" (label {row['label']})" if "label" in row else ""
                    print(f"\n{column.removesuffix('_ids')}{label}: {TRAIN_OPEN}{reply}{TRAIN_CLOSE}", file=out)
