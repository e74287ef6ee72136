"""The warning for messages holding a control token's text (``data.control_tokens``)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from sala_train.config.schema import DatasetColumns, DatasetConfig, DatasetFormat, DatasetTags
from sala_train.data.build import raw_splits
from sala_train.data.control_tokens import control_token_text_warning
from tests.conftest import TINY_CHAT

SHARED = Path(__file__).resolve().parents[3] / "shared"


def records(path: Path, **kw) -> object:
    cfg = DatasetConfig(name="t", train=[str(path)], validation=None, **kw)
    return raw_splits(cfg)["train"].records


def test_a_reply_quoting_the_end_of_turn_token_is_said_with_the_first_record(tmp_path):
    """Tokenized whole, a reply that quotes <|im_end|> trains the end-of-turn id in mid-reply."""
    reply = {"role": "assistant", "content": "A turn ends with <|im_end|> and that is all."}
    quoting = {"messages": [{"role": "user", "content": "How does a turn end?"}, reply]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello <im_end>."}]}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (plain, quoting, quoting)))
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    assert control_token_text_warning(records(path), tokenizer) == (
        "WARNING: the messages of 2 of 3 train records hold the text of the tokenizer's control token <|im_end|>, "
        "which the tokenizer reads as the token itself: a reply is trained to emit it there (the model then stops "
        "mid-reply), a prompt opens or ends turns. The first: 'A turn ends with <|im_end|> and "
        "that is all.'. Remove or rewrite it, unless the data means the token"
    )
    path.write_text(json.dumps(plain) + "\n")
    assert control_token_text_warning(records(path), tokenizer) is None


def test_the_control_token_check_reads_the_records_a_batch_at_a_time(tmp_path, monkeypatch):
    """Read in batches (a copy of a whole split took 800 MiB more at 400k records), its records are
    counted by their place in the split, not in their batch."""
    import sala_train.data.control_tokens as control_tokens
    from sala_train.data.records import arrow_batches

    reply = {"role": "assistant", "content": "A turn ends with <|im_end|>."}
    quoting = {"messages": [{"role": "user", "content": "How does a turn end?"}, reply]}
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (plain, quoting, plain, quoting, plain)))
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    whole = control_token_text_warning(records(path), tokenizer)
    monkeypatch.setattr(control_tokens, "arrow_batches", lambda split: arrow_batches(split, rows=2))
    assert whole is not None and "2 of 5 train records" in whole
    assert control_token_text_warning(records(path), tokenizer) == whole


def test_the_guides_kto_set_holds_an_end_of_text_token_a_minicpm_tokenizer_reads_as_one():
    """kto_en_demo.json has a completion holding "</s>" twice: MiniCPM's eos."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    kto = records(SHARED / "data/minicpm-sala-finetune/llama_factory/kto_en_demo.json", format=DatasetFormat.KTO,
                  columns=DatasetColumns(messages="messages", kto_tag="label"),
                  tags=DatasetTags(role_tag="role", content_tag="content", user_tag="user",
                                   assistant_tag="assistant"))  # fmt: skip
    warning = control_token_text_warning(kto, tokenizer)
    assert warning is not None and warning.startswith(
        "WARNING: the messages of 1 of 300 train records hold the text of the tokenizer's control token </s>,"
    ), warning
    assert "too subjective.</s>" in warning
    assert control_token_text_warning(kto, AutoTokenizer.from_pretrained(TINY_CHAT)) is None  # (</s>: plain text there)
