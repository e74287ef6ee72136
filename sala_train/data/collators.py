"""Dynamic padding: each batch pads to its own longest sample (rounded up on a GPU), never to a
fixed maximum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sala_train.data.chat import IGNORE_INDEX

# On a GPU, each batch shape met for the first time costs extra (a new plan: cuDNN builds an attention
# graph per shape, for one): on an H100 a 1.1B Llama's pass of 4 padded rows took 245 ms on widths not
# seen before and 78 ms on widths seen, so a short run padding each batch to its longest sample ran
# slower than one padding every sample to 2048. Rounding the width up bounds the shapes (cutoff_len / 64).
GPU_PAD_MULTIPLE = 64


def padding_multiple(setting: int | None) -> int | None:
    """``train.pad_to_multiple_of``, or where it is null: ``GPU_PAD_MULTIPLE`` when the run trains on
    a CUDA GPU (as ``arguments.training_kwargs`` decides: ``use_cpu`` without one), none on CPU,
    where a batch's cost is its tokens and shapes cost nothing."""
    if setting is not None:
        return setting if setting > 1 else None
    return GPU_PAD_MULTIPLE if torch.cuda.is_available() else None


@dataclass
class PadToLongestCollator:
    """``pad_to_multiple_of`` rounds the width up, to at most ``max_width`` (the longest a sample
    may be: padding past the model's positions would index learned position embeddings past their
    end); never below the batch's longest sample."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_width: int | None = None

    def width(self, lengths: list[int]) -> int:
        return self.width_of(max(lengths))

    def width_of(self, longest: int) -> int:
        """The width of a batch whose longest sample has ``longest`` tokens."""
        if not self.pad_to_multiple_of:
            return longest
        m = self.pad_to_multiple_of
        rounded = (longest + m - 1) // m * m
        return max(longest, min(rounded, self.max_width)) if self.max_width is not None else rounded

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
