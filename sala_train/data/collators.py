"""Dynamic padding: each batch pads to its own longest sample, never to a fixed maximum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sala_train.data.chat import IGNORE_INDEX


@dataclass
class PadToLongestCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def width(self, lengths: list[int]) -> int:
        longest = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        return longest

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
