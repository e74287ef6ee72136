"""Dynamic padding: each batch pads to its own longest sample (rounded up on a GPU), never to a
fixed maximum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sala_train.data.chat import IGNORE_INDEX

# On a GPU, each batch shape sdpa meets for the first time costs extra (a new plan: most likely cuDNN's
# attention graph, built per shape): on an H100 a 1.1B Llama's pass of 4 padded rows took 245 ms on widths
# not seen before and 78 ms on widths seen, so a short run padding each batch to its longest sample
# ran slower than one padding every sample to 2048. Rounding the width up bounds the widths to
# cutoff_len / 64. (flash_attention_2 and eager build nothing per shape: rounding would only add work.)
GPU_PAD_MULTIPLE = 64

# RoPE scalings that choose their frequencies from the batch's width (its largest position + 1):
# dynamic NTK scales by it past its threshold, LongRoPE switches every token to its long factors.
WIDTH_READING_ROPE = ("dynamic", "longrope")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padding_multiple(cfg: Any) -> int | None:
    """The multiple a run's padded batches are rounded up to: ``train.pad_to_multiple_of``, or where
    it is null, ``GPU_PAD_MULTIPLE`` when the run trains on a CUDA GPU (as
    ``arguments.training_kwargs`` decides) with sdpa attention and batches of a fixed size; else
    none. Under ``train.max_tokens_per_batch`` the multiple sizes the groups a mid-epoch resume
    must find again, so the default leaves them to the setting alone, not to the machine."""
    setting = cfg.train.pad_to_multiple_of
    if setting is not None:
        return setting if setting > 1 else None
    fixed_batches = cfg.train.max_tokens_per_batch is None
    sdpa = cfg.model.attn_implementation == "sdpa"  # (AttnImplementation is a str enum)
    return GPU_PAD_MULTIPLE if torch.cuda.is_available() and sdpa and fixed_batches else None


def width_limits(text_config: Any) -> tuple[int | None, int | None]:
    """(the model's positions, the threshold of a RoPE scaling that reads the batch's width), from
    its (text) config; None where it has none."""
    positions = getattr(text_config, "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 0 else None
    found = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    params = [found] if isinstance(found, dict) and ("rope_type" in found or "type" in found) else (
        [p for p in found.values() if isinstance(p, dict)] if isinstance(found, dict) else [])  # fmt: skip
    limits = []
    for p in params:
        if p.get("rope_type", p.get("type")) in WIDTH_READING_ROPE:
            limit = p.get("original_max_position_embeddings") or getattr(
                text_config, "original_max_position_embeddings", None) or positions  # fmt: skip
            if isinstance(limit, int) and limit > 0:
                limits.append(limit)
    return positions, min(limits) if limits else None


def pair_padding_multiple(cfg: Any, text_config: Any) -> tuple[int | None, str | None]:
    """(``padding_multiple`` for TRL's preference collators, or None and why not): they round with
    no cap, so only where the rounded width stays within the model's positions and no RoPE scaling
    reads the width."""
    multiple = padding_multiple(cfg)
    if multiple is None:
        return None, None
    positions, rope_limit = width_limits(text_config)
    if rope_limit is not None:
        return None, f"the model's RoPE scaling reads the batch's width (past {rope_limit} positions)"
    longest = min(cfg.dataset.cutoff_len, positions or cfg.dataset.cutoff_len)
    if positions is not None and round_up(longest, multiple) > positions:
        return None, f"a {longest}-token pair would be padded past the model's {positions} positions"
    return multiple, None


@dataclass
class PadToLongestCollator:
    """``pad_to_multiple_of`` rounds the width up, never below the batch's longest sample and never
    past ``max_width`` (the longest a sample may be: padding past the model's positions would index
    learned position embeddings past their end). ``rope_limit``: the threshold of a RoPE scaling
    that reads the width (``width_limits``): rounding stops there, and batches wider than it keep
    their longest sample's width, so every token gets the frequencies of the batch unrounded."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_width: int | None = None
    rope_limit: int | None = None

    def width(self, lengths: list[int]) -> int:
        return self.width_of(max(lengths))

    def width_of(self, longest: int) -> int:
        """The width of a batch whose longest sample has ``longest`` tokens."""
        m = self.pad_to_multiple_of
        if not m or (self.rope_limit is not None and longest > self.rope_limit):
            return longest
        rounded = round_up(longest, m)
        for limit in (self.max_width, self.rope_limit):
            if limit is not None:
                rounded = min(rounded, limit)
        return max(longest, rounded)

    def cells(self, lengths: list[int]) -> int:
        """The token positions of the batch of samples of ``lengths``, as ``__call__`` builds it
        (sala-data's padding figure, without building every batch)."""
        return self.width(lengths) * len(lengths)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = self.width([len(f["input_ids"]) for f in features])
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for row, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[row, :length] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
