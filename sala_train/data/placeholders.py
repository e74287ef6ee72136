"""Replies that still hold a template's placeholders (``{{name}}``), said before training.

LLaMA-Factory's ``identity.json`` (the ``identity`` dataset) ships its replies as "I am
{{name}}, an AI assistant developed by {{author}}", to be filled in first; trained as they are,
the model learns to call itself "{{name}}". Nothing in the data is wrong as such, so this is a
warning, not a refusal: a set of code or template tasks may mean them literally.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sala_train.data.records import arrow_batches

PLACEHOLDER = r"\{\{\s*([A-Za-z_]\w*)\s*\}\}"
# Said where a placeholder fills the replies of this many records, or of most of them (a small set).
ENOUGH_RECORDS = 10

# The canonical record columns that hold replies (data.records): a conversation's assistant turns,
# a preference pair's replies, a KTO completion.
_MESSAGE_LISTS = ("messages",)
_MESSAGES = ("chosen", "rejected", "completion")


def unfilled_placeholders_warning(records: Any, split: str = "train") -> str | None:
    """One warning line (for the command to prefix with its name), or None; ``records``: a split's
    canonical records (a datasets.Dataset)."""
    per_name: Counter[str] = Counter()
    found: set[tuple[int, str]] = set()
    total = 0
    for table in arrow_batches(records):
        for rows, contents in _replies(table):
            holding = pc.fill_null(pc.match_substring_regex(contents, PLACEHOLDER), False)  # (Arrow: no row loop)
            for row, text in zip(pc.filter(rows, holding).to_pylist(), pc.filter(contents, holding).to_pylist(),
                                 strict=True):  # fmt: skip
                found.update((total + row, name) for name in re.findall(PLACEHOLDER, text))
        total += table.num_rows
    per_name.update(name for _, name in found)
    common = sorted(name for name, count in per_name.items() if count >= min(ENOUGH_RECORDS, total // 2 + 1))
    if not common:
        return None
    held = len({row for row, name in found if name in common})
    shown = " or ".join("{{" + name + "}}" for name in common)
    return (f"WARNING: the replies of {held:,} of {total:,} {split} records hold {shown}, placeholders "
            "never filled in: the model would learn to say them as written. LLaMA-Factory's identity.json ships "
            "them so (replace {{name}} and {{author}} with your model's name and yours); if the data means them "
            "literally, nothing is wrong")  # fmt: skip


def _replies(table: pa.Table) -> list[tuple[pa.Array, pa.Array]]:
    """(record index, reply text) arrays, one pair per reply column the records have."""
    out = []
    for column in _MESSAGE_LISTS:
        if column not in table.column_names:
            continue
        lists = table.column(column).combine_chunks()
        messages = pc.list_flatten(lists)
        assistant = pc.equal(pc.struct_field(messages, "role"), "assistant")
        rows = pc.filter(pc.list_parent_indices(lists), assistant)
        out.append((rows, pc.filter(pc.struct_field(messages, "content"), assistant)))
    for column in _MESSAGES:
        if column in table.column_names:
            replies = table.column(column).combine_chunks()
            out.append((pa.array(range(len(replies)), pa.int64()), pc.struct_field(replies, "content")))
    return out
