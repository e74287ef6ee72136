"""``dataset.columns.history`` in preference (DPO) and KTO data: LLaMA-Factory's alpaca-style ranking
and KTO layouts put each [query, response] pair into the prompt as earlier user and assistant turns,
after the system prompt and before the current user turn (as alpaca SFT data does)."""

from __future__ import annotations

import pytest

from sala_train.config.schema import DatasetColumns, DatasetFormat, DpoStage, KtoStage, OnError
from sala_train.data.build import build_data
from sala_train.data.formats import load_split
from sala_train.errors import DataError
from tests.unit.test_formats import chatml, dataset, ids, write

ALPACA_STYLE = DatasetColumns(prompt="instruction", query="input", history="history", system="system")
HISTORY = [["What is 1+1?", "2"], ["And 1+2?", "3"]]


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content, "tool_calls": ""}


def prompts(files: list[str], fmt: DatasetFormat, **kw) -> list[list[dict[str, str]]]:
    return list(load_split(dataset(files, fmt, **kw), "train", kw.get("on_error", OnError.FAIL)).records["prompt"])


def test_dpo_prompt_holds_the_history_between_the_system_and_the_question(tmp_path, tokenizer):
    record = {"instruction": "And 2+2?", "input": "Answer with a digit.", "history": HISTORY, "system": "Be exact.",
              "chosen": "4", "rejected": "5"}  # fmt: skip
    files = [write(tmp_path / "p.json", [record])]
    expected = [turn("system", "Be exact."), turn("user", "What is 1+1?"), turn("assistant", "2"),
                turn("user", "And 1+2?"), turn("assistant", "3"),
                turn("user", "And 2+2?\nAnswer with a digit.")]  # fmt: skip
    assert prompts(files, DatasetFormat.PREFERENCE, columns=ALPACA_STYLE) == [expected]
    cfg = dataset(files, DatasetFormat.PREFERENCE, columns=ALPACA_STYLE)
    (row,) = build_data(DpoStage(), cfg, tokenizer).splits["train"]
    assert row["prompt_ids"] == ids(tokenizer, chatml(*[(m["role"], m["content"]) for m in expected], generation=True))
    assert row["chosen_ids"] == ids(tokenizer, "4<|im_end|>")


def test_kto_prompt_holds_the_history_before_the_question(tmp_path, tokenizer):
    records = [
        {"instruction": "And 2+2?", "history": HISTORY, "completion": "4", "label": True},
        {"instruction": "And 3+3?", "history": [], "completion": "7", "label": False},  # no earlier turns
        {"instruction": "And 4+4?", "history": None, "completion": "8", "label": True},
    ]
    files = [write(tmp_path / "k.jsonl", records, jsonl=True)]
    columns = DatasetColumns(prompt="instruction", history="history")
    first = [turn("user", "What is 1+1?"), turn("assistant", "2"), turn("user", "And 1+2?"), turn("assistant", "3"),
             turn("user", "And 2+2?")]  # fmt: skip
    assert prompts(files, DatasetFormat.KTO, columns=columns) == [first, [turn("user", "And 3+3?")],
                                                                  [turn("user", "And 4+4?")]]  # fmt: skip
    rows = build_data(KtoStage(), dataset(files, DatasetFormat.KTO, columns=columns), tokenizer).splits["train"]
    assert rows[0]["prompt_ids"] == ids(tokenizer, chatml(*[(m["role"], m["content"]) for m in first], generation=True))
    assert rows[0]["completion_ids"] == ids(tokenizer, "4<|im_end|>") and rows[0]["label"] is True


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        (DatasetFormat.PREFERENCE, {"instruction": "Q", "chosen": "A", "rejected": "B"}),
        (DatasetFormat.KTO, {"instruction": "Q", "completion": "A", "label": True}),
    ],
)
def test_a_history_field_the_file_lacks_is_refused(tmp_path, tokenizer, fmt, record):
    path = write(tmp_path / "d.jsonl", [record], jsonl=True)
    columns = DatasetColumns(prompt="instruction", history="no_such_field")
    stage = DpoStage() if fmt == DatasetFormat.PREFERENCE else KtoStage()
    with pytest.raises(DataError) as err:
        build_data(stage, dataset([path], fmt, columns=columns), tokenizer)
    found = ", ".join(sorted(record))
    assert str(err.value) == f"{path}: no field named by dataset.columns.history=no_such_field (found: {found})"


@pytest.mark.parametrize("fmt", [DatasetFormat.PREFERENCE, DatasetFormat.KTO])
def test_malformed_history_is_a_bad_record_as_in_sft(tmp_path, fmt):
    reply = {"chosen": "A", "rejected": "B"} if fmt == DatasetFormat.PREFERENCE else {"completion": "A", "label": True}
    good = {"instruction": "Q", "history": [["Hi", "Hello."]], **reply}
    bad = [{**good, "history": [["only a query"]]}, {**good, "history": [["Hi", ""]]}]
    files = [write(tmp_path / "d.jsonl", [good, *bad], jsonl=True)]
    columns = DatasetColumns(prompt="instruction", history="history")
    with pytest.raises(DataError) as err:
        prompts(files, fmt, columns=columns)
    text = str(err.value)
    assert "2 bad record(s) (2 malformed history)" in text
    for line in (2, 3):
        assert f"d.jsonl:{line}: malformed history: 'history'[0] must be a [query, response] pair" in text
    kept = prompts(files, fmt, columns=columns, on_error=OnError.SKIP)
    assert kept == [[turn("user", "Hi"), turn("assistant", "Hello."), turn("user", "Q")]]


def test_history_beside_a_conversation_prompt_is_refused_not_dropped(tmp_path):
    """A prompt given as messages holds its own earlier turns; history beside it is not silently lost."""
    record = {"prompt": [{"role": "user", "content": "Q"}], "history": HISTORY, "chosen": "A", "rejected": "B"}
    files = [write(tmp_path / "d.jsonl", [record, {**record, "history": []}], jsonl=True)]
    columns = DatasetColumns(history="history")
    with pytest.raises(DataError, match=r"d.jsonl:1: unsupported history: 'history' beside 'prompt'"):
        prompts(files, DatasetFormat.PREFERENCE, columns=columns)
    kept = prompts(files, DatasetFormat.PREFERENCE, columns=columns, on_error=OnError.SKIP)
    assert kept == [[turn("user", "Q")]]
    # KTO's conversation layout (prompt and completion in one list of messages) likewise
    kto = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "label": True,
           "history": HISTORY}  # fmt: skip
    files = [write(tmp_path / "k.jsonl", [kto], jsonl=True)]
    columns = DatasetColumns(messages="messages", history="history")
    with pytest.raises(DataError, match=r"k.jsonl:1: unsupported history: 'history' beside 'messages'"):
        prompts(files, DatasetFormat.KTO, columns=columns)
