"""Token-budget batches: each training batch holds as many samples as fit ``max_tokens_per_batch``.

Fixed sample counts give packed batches whose size swings with sample length (and padded ones
whose padding does); a budget keeps every step's work about the same. Groups are formed once, in a
seeded shuffled order, and become the items the Trainer's sampler shuffles and shards across ranks
(so DDP ranks get whole groups). Written by hand: neither transformers nor accelerate offers a
token-budget sampler that works with the Trainer's distributed and resumable data loading.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch


def budget_groups(lengths: list[int], budget: int, packed: bool, seed: int) -> list[list[int]]:
    """Indices in groups whose cost fits ``budget``: the sum of lengths (packed) or longest x
    count (padded). A sample longer than the budget gets a group of its own."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = [*current, index]
        sizes = [lengths[i] for i in candidate]
        cost = sum(sizes) if packed else max(sizes) * len(sizes)
        if current and cost > budget:
            groups.append(current)
            candidate = [index]
        current = candidate
    if current:
        groups.append(current)
    return groups


class GroupedDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Item ``i`` is the list of samples of group ``i``."""

    def __init__(self, samples: Any, groups: list[list[int]]):
        self.samples = samples
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.samples[i] for i in self.groups[index]]


@dataclass
class GroupCollator:
    """Batches of one group (per_device_train_batch_size=1) -> the inner collator's batch."""

    inner: Any

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        features = [f for item in items for f in (item if isinstance(item, list) else [item])]
        return self.inner(features)
