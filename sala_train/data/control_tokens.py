"""Messages that hold the text of the tokenizer's control tokens (``</s>``, ``<|im_end|>``), said
before training.

A conversation is tokenized whole, as its chat template renders it, and a tokenizer reads the text
of a special token as that token wherever it stands (LLaMA-Factory and TRL tokenize so too). A
reply that quotes ``<|im_end|>`` or ``</s>`` is then trained to emit the end-of-turn or end of text
token in mid-reply, and the model learns to stop there; one in a prompt opens or closes turns the
data never meant. The guide's own KTO set (``kto_en_demo.json``) has a completion holding ``</s>``
twice. The data may mean it, so this is a warning, naming how many records and the first one.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sala_train.data.records import arrow_batches

# Characters of the first record's text shown on each side of the token.
_CONTEXT = 30


def control_token_text_warning(records: Any, tokenizer: Any, split: str = "train") -> str | None:
    """One warning line (for the command to prefix with its name), or None; ``records``: a split's
    canonical records (a datasets.Dataset); ``tokenizer``: as the data is tokenized with it (its
    chat template's end-of-turn token added)."""
    tokens = _control_tokens(tokenizer)
    if not tokens:
        return None
    held: set[int] = set()
    named: set[str] = set()
    first: tuple[int, str, str] | None = None
    total = 0
    for table in arrow_batches(records):
        for rows, texts in _texts(table):
            for token in tokens:
                holding = pc.fill_null(pc.match_substring(texts, token), False)  # (Arrow: no row loop)
                found = [total + row for row in pc.filter(rows, holding).to_pylist()]
                if not found:
                    continue
                named.add(token)
                held.update(found)
                row, text = found[0], pc.filter(texts, holding)[0].as_py()
                if first is None or row < first[0]:
                    first = (row, token, text)
        total += table.num_rows
    if first is None:
        return None
    _, token, text = first
    at = text.index(token)
    snippet = text[max(at - _CONTEXT, 0) : at + len(token) + _CONTEXT]
    which = f"control token{'s' if len(named) > 1 else ''} {', '.join(sorted(named))}"
    return (f"WARNING: the messages of {len(held):,} of {total:,} {split} records hold the text of the "
            f"tokenizer's {which}, which the tokenizer reads as the "
            f"token itself: a reply is trained to emit it there (the model then stops mid-reply), a prompt opens or "
            f"ends turns. The first: {snippet!r}. Remove or rewrite it, unless the data "
            "means the token")  # fmt: skip


def _control_tokens(tokenizer: Any) -> list[str]:
    """The tokens that end or open text and turns (bos, eos, pad, the chat markers), each only where
    the tokenizer reads its text inside other text as the one token."""
    candidates = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, "<|im_start|>", "<|im_end|>"}
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
    }
    out = []
    for token in sorted(t for t in candidates if isinstance(t, str) and t and t in special):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id in tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]:
            out.append(token)
    return out


def _texts(table: pa.Table) -> list[tuple[pa.Array, pa.Array]]:
    """(record index, text) arrays: every message's content in the columns that hold messages (a
    list of them, or one), and a text column's documents."""
    out = []
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        kind = column.type
        if pa.types.is_list(kind) and pa.types.is_struct(kind.value_type) and _has_content(kind.value_type):
            messages = pc.list_flatten(column)
            out.append((pc.list_parent_indices(column), pc.struct_field(messages, "content")))
        elif pa.types.is_struct(kind) and _has_content(kind):
            out.append((pa.array(range(len(column)), pa.int64()), pc.struct_field(column, "content")))
        elif name == "text" and pa.types.is_string(kind):
            out.append((pa.array(range(len(column)), pa.int64()), column))
    return out


def _has_content(struct: pa.StructType) -> bool:
    return any(struct.field(i).name == "content" and pa.types.is_string(struct.field(i).type)
               for i in range(struct.num_fields))  # fmt: skip
