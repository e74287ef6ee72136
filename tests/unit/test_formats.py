"""Every dataset format and column/tag mapping -> the exact tokens and masks, checked by hand.

Expected token sequences are built independently: the ChatML text is written out here and
tokenized whole, never through sala-train's segment code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from sala_train.config.schema import (
    ChatTemplate,
    DatasetColumns,
    DatasetConfig,
    DatasetFormat,
    DatasetSource,
    DatasetTags,
    DpoStage,
    KtoStage,
    MixStrategy,
    OnError,
    PretrainStage,
    SftStage,
    ToolFormat,
)
from sala_train.data.build import build_data, raw_splits
from sala_train.data.chat import IGNORE_INDEX
from sala_train.data.formats import load_split
from sala_train.errors import DataError
from tests.conftest import SHARED

LF_DATA = SHARED / "data" / "llamafactory"
GUIDE_LF = SHARED / "data" / "minicpm-sala-finetune" / "llama_factory"
SHAREGPT_TAGS = DatasetTags(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt")


def chatml(*turns: tuple[str, str], generation: bool = False) -> str:
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation else "")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    )


def write(path: Path, records: list, jsonl: bool = False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return str(path)


def dataset(files: list[str], fmt: DatasetFormat, **kw) -> DatasetConfig:
    return DatasetConfig(name="t", train=files, validation=files, format=fmt, **kw)


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


# --- chat formats --------------------------------------------------------------------------------


def test_alpaca_with_input_history_and_system(tmp_path, tokenizer):
    record = {"instruction": "Add.", "input": "2 + 2", "output": "4.", "system": "Be brief.",
              "history": [["Hi", "Hello."]]}  # fmt: skip
    data = build_data(SftStage(), dataset([write(tmp_path / "a.json", [record])], DatasetFormat.ALPACA), tokenizer)
    row = data.splits["train"][0]
    assert row["input_ids"] == ids(tokenizer, chatml(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."),
                                                     ("user", "Add.\n2 + 2"), ("assistant", "4.")))  # fmt: skip
    assert trained_text(tokenizer, row) == "Hello.<|im_end|>4.<|im_end|>"


def test_sharegpt_tags_and_custom_role_names(tmp_path, tokenizer):
    record = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello."}]}
    tags = DatasetTags(role_tag="speaker", content_tag="text", user_tag="me", assistant_tag="bot")
    files = [write(tmp_path / "s.jsonl", [record], jsonl=True)]
    cfg = dataset(files, DatasetFormat.SHAREGPT, columns=DatasetColumns(messages="dialog"), tags=tags)
    row = build_data(SftStage(), cfg, tokenizer).splits["train"][0]
    assert row["input_ids"] == ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Hello.")))


def test_mask_history_and_train_on_prompt(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B."},
                           {"role": "user", "content": "C"}, {"role": "assistant", "content": "D."}]}  # fmt: skip
    files = [write(tmp_path / "m.json", [record])]
    full = ids(tokenizer, chatml(("user", "A"), ("assistant", "B."), ("user", "C"), ("assistant", "D.")))
    last_only = build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES, mask_history=True), tokenizer)
    assert trained_text(tokenizer, last_only.splits["train"][0]) == "D.<|im_end|>"
    everything = build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES, train_on_prompt=True), tokenizer)
    assert everything.splits["train"][0]["labels"] == full


def test_mask_history_drops_the_earliest_exchanges_not_the_reply_it_trains(tmp_path, tokenizer):
    turns = [
        ("system", "Be brief."),
        ("user", "A " * 20),
        ("assistant", "B " * 20),
        ("user", "Call it."),
        ("assistant", ""),
        ("tool", "sun"),
        ("assistant", "Sunny."),
        ("user", "And now?"),
        ("assistant", "Rain."),
    ]
    messages = [{"role": r, "content": c} for r, c in turns]
    messages[4] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {  # (OpenAI: no content)
        "name": "weather", "arguments": "{}"}}]}  # fmt: skip
    files = [write(tmp_path / "m.json", [{"messages": messages}])]
    kept = chatml(("system", "Be brief."), ("user", "And now?"), ("assistant", "Rain."))
    call = "Action: weather\nAction Input: {}"
    last_two = chatml(("system", "Be brief."), ("user", "Call it."), ("assistant", call), ("tool", "sun"),
                      ("assistant", "Sunny."), ("user", "And now?"), ("assistant", "Rain."))  # fmt: skip
    # cutoffs that fit the last two exchanges (the tool call's too), then only the last one
    for cutoff, expected in ((len(ids(tokenizer, last_two)), last_two), (len(ids(tokenizer, kept)), kept)):
        cfg = dataset(files, DatasetFormat.MESSAGES, mask_history=True, cutoff_len=cutoff, template=ChatTemplate.CHATML)
        data = build_data(SftStage(), cfg, copy.deepcopy(tokenizer))
        (row,) = data.splits["train"]
        assert row["input_ids"] == ids(tokenizer, expected), cutoff
        assert trained_text(tokenizer, row) == "Rain.<|im_end|>"
        assert data.stats["train"].truncated == 1


def test_alpaca_input_without_an_instruction_is_the_prompt(tmp_path, tokenizer):
    """As LLaMA-Factory joins them: the parts that are not blank, one per line."""
    records = [
        {"instruction": "", "input": "2 + 2", "output": "4."},
        {"instruction": "Add.", "input": " ", "output": "4."},
    ]
    rows = build_data(SftStage(), dataset([write(tmp_path / "a.json", records)], DatasetFormat.ALPACA), tokenizer)
    first, second = rows.splits["train"]
    assert first["input_ids"] == ids(tokenizer, chatml(("user", "2 + 2"), ("assistant", "4.")))
    assert second["input_ids"] == ids(tokenizer, chatml(("user", "Add."), ("assistant", "4.")))


def test_every_guide_alpaca_file_loads(tokenizer):
    for path in (LF_DATA / "alpaca_en_demo.json", LF_DATA / "identity.json", GUIDE_LF / "sft_zh_demo.json"):
        records = json.loads(needs(path).read_text())
        cfg = dataset([str(path)], DatasetFormat.ALPACA, cutoff_len=4096, max_samples=20)
        row = build_data(SftStage(), cfg, tokenizer).splits["train"][0]
        first = records[0]
        user = first["instruction"] + (f"\n{first['input']}" if first["input"] else "")
        assert row["input_ids"] == ids(tokenizer, chatml(("user", user), ("assistant", first["output"]))), path


# --- preference and KTO ---------------------------------------------------------------------------


def test_guide_dpo_demo_prompt_chosen_rejected(tokenizer):
    path = needs(GUIDE_LF / "dpo_en_demo.json")
    first = json.loads(path.read_text())[0]
    cfg = dataset([str(path)], DatasetFormat.PREFERENCE, cutoff_len=100_000, max_samples=5,
                  columns=DatasetColumns(messages="conversations"), tags=SHAREGPT_TAGS)  # fmt: skip
    row = build_data(DpoStage(), cfg, tokenizer).splits["train"][0]
    (turn,) = first["conversations"]
    assert row["prompt_ids"] == ids(tokenizer, chatml(("user", turn["value"]), generation=True))
    assert row["chosen_ids"] == ids(tokenizer, first["chosen"]["value"] + "<|im_end|>")
    assert row["rejected_ids"] == ids(tokenizer, first["rejected"]["value"] + "<|im_end|>")


def test_guide_kto_demo_completion_and_label(tokenizer):
    path = needs(GUIDE_LF / "kto_en_demo.json")
    records = json.loads(path.read_text())[:5]
    cfg = dataset([str(path)], DatasetFormat.KTO, cutoff_len=100_000, max_samples=5,
                  columns=DatasetColumns(messages="messages", kto_tag="label"))  # fmt: skip
    split = build_data(KtoStage(), cfg, tokenizer).splits["train"]
    for row, record in zip(split, records, strict=True):
        *prompt, reply = record["messages"]
        assert row["prompt_ids"] == ids(
            tokenizer, chatml(*[(m["role"], m["content"]) for m in prompt], generation=True)
        )
        assert row["completion_ids"] == ids(tokenizer, reply["content"] + "<|im_end|>")
        assert row["label"] is record["label"]
    assert {row["label"] for row in split} == {True, False}


def test_kto_in_alpaca_layout_takes_llamafactorys_response_column(tmp_path, tokenizer):
    """LLaMA-Factory's KTO entries map the reply with `response` (alpaca's `output`); it was ignored
    and the file refused for lacking a `completion` field."""
    records = [{"instruction": "Name a colour.", "input": "One word.", "output": "Blue.", "label": True},
               {"instruction": "Add 2 and 2.", "input": "", "output": "Five.", "label": False}]  # fmt: skip
    columns = DatasetColumns(prompt="instruction", query="input", response="output", kto_tag="label")
    cfg = dataset([write(tmp_path / "k.json", records)], DatasetFormat.KTO, columns=columns)
    split = build_data(KtoStage(), cfg, tokenizer).splits["train"]
    for row, record in zip(split, records, strict=True):
        prompt = "\n".join(part for part in (record["instruction"], record["input"]) if part)
        assert row["prompt_ids"] == ids(tokenizer, chatml(("user", prompt), generation=True))
        assert row["completion_ids"] == ids(tokenizer, record["output"] + "<|im_end|>")
        assert row["label"] is record["label"]


def test_trls_implicit_prompt_layout_is_the_shared_turns_of_chosen_and_rejected(tmp_path, tokenizer):
    """TRL's implicit-prompt pairs (its ultrafeedback_binarized, hh-rlhf sets): no prompt field,
    chosen and rejected whole conversations sharing every turn but the last. They were refused as
    a file without a 'prompt' field."""
    shared = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4."}, {"role": "user", "content": "Sure?"}]  # fmt: skip
    records = [{"chosen": [*shared, {"role": "assistant", "content": "Yes."}],
                "rejected": [*shared, {"role": "assistant", "content": "No idea."}]}]  # fmt: skip
    for jsonl in (False, True):
        cfg = dataset([write(tmp_path / f"implicit.json{'l' * jsonl}", records, jsonl=jsonl)], DatasetFormat.PREFERENCE)
        row = build_data(DpoStage(), cfg, tokenizer).splits["train"][0]
        turns = [(m["role"], m["content"]) for m in shared]
        assert row["prompt_ids"] == ids(tokenizer, chatml(*turns, generation=True))
        assert row["chosen_ids"] == ids(tokenizer, "Yes.<|im_end|>")
        assert row["rejected_ids"] == ids(tokenizer, "No idea.<|im_end|>")

    # Turns before the replies that differ: no shared prompt, a bad record by line.
    apart = json.loads(json.dumps(records[0]))  # (deepcopy would keep chosen's and rejected's turns one object)
    apart["rejected"][1]["content"] = "3+3?"
    cfg = dataset([write(tmp_path / "apart.jsonl", [records[0], apart], jsonl=True)], DatasetFormat.PREFERENCE)
    with pytest.raises(DataError) as caught:
        build_data(DpoStage(), cfg, tokenizer, raw=raw_splits(cfg))
    assert "apart.jsonl:2: malformed reply: no 'prompt', and 'chosen' and 'rejected' do not share every turn but " \
        "their last (TRL's implicit prompt)" in str(caught.value)  # fmt: skip
    # A file whose first record is a bad one (text replies): the layout is still seen, and that
    # record is the bad one.
    text_pair = {"chosen": "Yes.", "rejected": "No."}
    cfg = dataset([write(tmp_path / "first.jsonl", [text_pair, *records], jsonl=True)], DatasetFormat.PREFERENCE)
    with pytest.raises(DataError) as caught:
        build_data(DpoStage(), cfg, tokenizer, raw=raw_splits(cfg))
    assert "first.jsonl:1: missing field: no 'prompt', and 'chosen' is not a whole conversation either" in str(
        caught.value
    )
    # Replies as text without a prompt field: the file lacks its prompt, as before.
    cfg = dataset([write(tmp_path / "text.jsonl", [{"chosen": "Yes.", "rejected": "No."}], jsonl=True)],
                  DatasetFormat.PREFERENCE)  # fmt: skip
    with pytest.raises(DataError, match=r"text.jsonl: no field 'prompt' for dataset.format=preference \(found: "):
        raw_splits(cfg)
    # A prompt field the config names is the prompt: never inferred in its place.
    cfg = dataset([write(tmp_path / "named.json", records)], DatasetFormat.PREFERENCE,
                  columns=DatasetColumns(prompt="question"))  # fmt: skip
    with pytest.raises(DataError, match=r"named.json: no field 'question' for dataset.format=preference"):
        raw_splits(cfg)


def test_trl_default_names_and_truncation_keep_the_prompt(tmp_path, tokenizer):
    record = {"prompt": "Q?", "chosen": "Yes, absolutely and without doubt.", "rejected": "No."}
    files = [write(tmp_path / "p.jsonl", [record], jsonl=True)]
    prompt = ids(tokenizer, chatml(("user", "Q?"), generation=True))
    cfg = dataset(files, DatasetFormat.PREFERENCE, cutoff_len=len(prompt) + 3)
    data = build_data(DpoStage(), cfg, tokenizer)
    row = data.splits["train"][0]
    assert row["prompt_ids"] == prompt and len(row["chosen_ids"]) == 3 and data.stats["train"].truncated == 1


def test_a_pair_whose_replies_differ_only_past_the_cutoff_is_dropped_and_counted(tmp_path, tokenizer):
    """Cut to the same ids, chosen and rejected give no gradient and lower the reported
    preference accuracy; they were kept without a word."""
    from sala_train.data.build import DROP_SAME_WITHIN_CUTOFF

    same_start = {
        "prompt": "Q?",
        "chosen": "Both Australia and New Zealand.",
        "rejected": "Both Australia and New Guinea.",
    }
    other = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
    files = [write(tmp_path / "p.jsonl", [same_start, other], jsonl=True)]
    prompt = ids(tokenizer, chatml(("user", "Q?"), generation=True))
    common = len(ids(tokenizer, "Both Australia and New"))
    cut = dataset(files, DatasetFormat.PREFERENCE, cutoff_len=len(prompt) + common)
    data = build_data(DpoStage(), cut, tokenizer)
    assert [tokenizer.decode(row["chosen_ids"]) for row in data.splits["train"]] == ["Yes.<|im_end|>"]
    assert data.stats["train"].dropped == {DROP_SAME_WITHIN_CUTOFF: 1}
    whole = build_data(DpoStage(), dataset(files, DatasetFormat.PREFERENCE, cutoff_len=4096), tokenizer)
    assert len(whole.splits["train"]) == 2 and not whole.stats["train"].dropped
    with pytest.raises(DataError, match=r"every sample was dropped \(1 chosen and rejected the same within "
                       r"dataset.cutoff_len\); raise dataset.cutoff_len"):  # fmt: skip
        only = [write(tmp_path / "s.jsonl", [same_start], jsonl=True)]
        build_data(DpoStage(), dataset(only, DatasetFormat.PREFERENCE, cutoff_len=len(prompt) + common), tokenizer)


# --- text ----------------------------------------------------------------------------------------


def test_pretrain_blocks_are_documents_joined_by_eos(tmp_path, tokenizer):
    docs = [{"text": f"Document number {i} says hello to the world."} for i in range(30)]
    cfg = dataset([write(tmp_path / "t.jsonl", docs, jsonl=True)], DatasetFormat.TEXT, cutoff_len=16)
    data = build_data(PretrainStage(), cfg, tokenizer)
    blocks = data.splits["train"]
    stream = [t for d in docs for t in [*ids(tokenizer, d["text"]), tokenizer.eos_token_id]]
    assert all(len(b["input_ids"]) == 16 and b["labels"] == b["input_ids"] for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[: len(blocks) * 16]
    assert len(blocks) == len(stream) // 16 and len(stream) % 16
    # What sala-data reports: the partial last block left out, and a block's first token is never a target.
    stats = data.stats["train"]
    assert stats.left_out_tokens == len(stream) % 16 and stats.trained_tokens == len(blocks) * 15


def test_pretrain_with_a_tokenizer_without_eos_names_the_model(tmp_path, tokenizer):
    """The refusal said only "the tokenizer has none": which one, and where to give it one."""
    import copy

    docs = [{"text": "Document one."}, {"text": "Document two."}]
    cfg = dataset([write(tmp_path / "t.jsonl", docs, jsonl=True)], DatasetFormat.TEXT, cutoff_len=16)
    without_eos = copy.deepcopy(tokenizer)
    without_eos.eos_token = None
    assert without_eos.eos_token_id is None
    named = re.escape(str(tokenizer.name_or_path))
    with pytest.raises(DataError, match=rf"between documents; the tokenizer of model.name_or_path={named} has none \("):
        build_data(PretrainStage(), cfg, without_eos)


def test_pretrain_text_documents_begin_with_the_bos_a_tokenizer_adds(tmp_path, tokenizer):
    """A Llama-style tokenizer (MiniCPM's) puts BOS before text: each text document starts with it,
    as transformers' run_clm example encodes documents; a conversation is its template's rendering,
    whatever the tokenizer adds. One that also ends text with EOS gets no second one."""
    import copy

    from tokenizers.processors import TemplateProcessing

    def adding(single: str) -> object:
        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens({"bos_token": "<s>"})
        specials = [("<s>", tok.bos_token_id), (tok.eos_token, tok.eos_token_id)]
        tok._tokenizer.post_processor = TemplateProcessing(single=single, special_tokens=specials)
        return tok

    cfg = _text_mixed_with_chat(tmp_path)
    bos_first = adding("<s> $A")
    bos, eos = bos_first.bos_token_id, bos_first.eos_token_id
    assert bos_first("x")["input_ids"][0] == bos  # (the tokenizer does add it)
    conversation = ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Hello.")))
    expected = [*(t for d in PLAIN_DOCS for t in [bos, *ids(tokenizer, d["text"]), eos]), *conversation, eos]
    assert build_data(PretrainStage(), cfg, bos_first).splits["train"][0]["input_ids"] == expected
    both = adding(f"<s> $A {tokenizer.eos_token}")
    assert build_data(PretrainStage(), cfg, both).splits["train"][0]["input_ids"] == expected


def test_guide_c4_demo_mapping(tokenizer):
    path = needs(LF_DATA / "c4_demo.jsonl")
    cfg = dataset(
        [str(path)], DatasetFormat.TEXT, cutoff_len=64, max_samples=10, columns=DatasetColumns(prompt="text")
    )  # fmt: skip (LLaMA-Factory's own mapping)
    first = json.loads(path.read_text().splitlines()[0])["text"]
    block = build_data(PretrainStage(), cfg, tokenizer).splits["train"][0]
    assert block["input_ids"] == ids(tokenizer, first)[:64]


# --- files ----------------------------------------------------------------------------------------


def test_parquet_csv_and_directories(tmp_path, tokenizer):
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(6)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_list(rows[2:4]).to_csv(str(folder / "b.csv"), index=False)
    write(folder / "c.json", rows[4:])
    cfg = dataset([str(folder)], DatasetFormat.ALPACA)
    split = build_data(SftStage(), cfg, tokenizer).splits["train"]
    assert [trained_text(tokenizer, r) for r in split] == [f"{i}.<|im_end|>" for i in range(6)]


def test_named_template_for_a_tokenizer_without_one(tmp_path, tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}
    files = [write(tmp_path / "m.json", [record])]
    with pytest.raises(DataError, match="no chat template"):
        build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES), copy.deepcopy(bare))
    row = build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES, template=ChatTemplate.CHATML), bare).splits[
        "train"
    ][0]
    assert row["input_ids"] == ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Yo.")))


# --- tool calls -----------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "description": "Local time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}  # fmt: skip


def tools_turn(tools: list[dict], system: str = "") -> str:
    """The system turn chatml/cpm4 write when tools are offered (LLaMA-Factory's default tool format),
    spelled out by hand; tests/unit/test_llamafactory_tools.py holds the template to LLaMA-Factory itself."""
    listed = ""
    for tool in tools:
        params = tool["parameters"]
        listed += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n"
        for name, param in params["properties"].items():
            required = ", required" if name in params.get("required", []) else ""
            listed += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}\n"
        listed += "\n"
    names = ", ".join(tool["name"] for tool in tools)
    return ("<|im_start|>system\n" + system + "You have access to the following tools:\n" + listed
            + f"Use the following format if using a tool:\n```\nAction: tool name (one of [{names}])\n"
            + "Action Input: the input to the tool, in a JSON format representing the kwargs "
            + '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n<|im_end|>\n')  # fmt: skip


def call_text(name: str, arguments: dict) -> str:
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


def test_glaive_layout_trains_the_call_and_the_answer_not_the_result(tmp_path, tokenizer):
    """LLaMA-Factory's glaive_toolcall layout: function_call / observation turns, tools as JSON text."""
    import copy

    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temperature": 18}'},
        {"from": "gpt", "value": "It is 18 degrees."},
    ], "tools": json.dumps([WEATHER, TIME]), "system": "Be brief."}  # fmt: skip
    cfg = dataset([write(tmp_path / "g.json", [record])], DatasetFormat.SHAREGPT, template=ChatTemplate.CHATML,
                  columns=DatasetColumns(messages="conversations", tools="tools"))  # fmt: skip
    row = build_data(SftStage(), cfg, copy.deepcopy(tokenizer)).splits["train"][0]
    call = call_text("get_weather", {"city": "Paris"})
    expected = tools_turn([WEATHER, TIME], "Be brief.") + chatml(
        ("user", "Weather in Paris?"), ("assistant", call), ("tool", '{"temperature": 18}'),
        ("assistant", "It is 18 degrees."))  # fmt: skip
    assert row["input_ids"] == ids(tokenizer, expected)
    assert trained_text(tokenizer, row) == f"{call}<|im_end|>It is 18 degrees.<|im_end|>"


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_openai_messages_with_parallel_calls_and_tools_as_objects(tmp_path, tokenizer, suffix):
    """OpenAI's shape: assistant ``tool_calls`` (arguments as JSON text) beside its text, one ``tool``
    message per result, tools as objects. Each record keeps exactly its own tool schemas, also from
    Parquet, whose one struct type gives every record the other records' keys as nulls."""
    import copy

    import pyarrow as pa
    import pyarrow.parquet as pq

    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    first = {
        "messages": [
            {"role": "user", "content": "Oslo weather and time?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": calls},
            {"role": "tool", "content": "rain"},
            {"role": "tool", "content": "10:00"},
            {"role": "assistant", "content": "Rain, and it is 10:00."},
        ],
        "tools": [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}],
    }
    second = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
              "tools": [{"type": "function", "function": TIME}]}  # fmt: skip
    path = tmp_path / f"m.{suffix}"
    if suffix == "parquet":
        table = pa.Table.from_pylist([first, second])
        assert table.to_pylist()[1]["tools"][0]["function"]["parameters"]["required"] is None  # the nulls
        pq.write_table(table, path)
    else:
        write(path, [first, second], jsonl=True)
    cfg = dataset([str(path)], DatasetFormat.MESSAGES, template=ChatTemplate.CHATML)
    rows = build_data(SftStage(), cfg, copy.deepcopy(tokenizer)).splits["train"]
    reply = "Checking.\n" + call_text("get_weather", {"city": "Oslo"}) + "\n" + call_text("get_time", {"zone": "CET"})
    assert rows[0]["input_ids"] == ids(tokenizer, tools_turn([WEATHER, TIME]) + chatml(
        ("user", "Oslo weather and time?"), ("assistant", reply), ("tool", "rain"), ("tool", "10:00"),
        ("assistant", "Rain, and it is 10:00.")))  # fmt: skip
    assert trained_text(tokenizer, rows[0]) == f"{reply}<|im_end|>Rain, and it is 10:00.<|im_end|>"
    assert rows[1]["input_ids"] == ids(tokenizer, tools_turn([TIME]) + chatml(("user", "Hi"), ("assistant", "Hello.")))


def test_a_template_that_drops_tool_calls_is_refused(tmp_path, tokenizer):
    """The tiny tokenizer's own ChatML template prints only ``content``: a call turn would be empty."""
    import copy

    record = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {}})},
        {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."},
    ]}  # fmt: skip
    cfg = dataset([write(tmp_path / "g.json", [record])], DatasetFormat.SHAREGPT)
    with pytest.raises(DataError, match=r"does not render tool calls .*dataset.template=chatml"):
        build_data(SftStage(), cfg, copy.deepcopy(tokenizer))


def test_a_call_turn_ends_where_plain_replies_end(tmp_path, tokenizer):
    """With call delimiters registered as special tokens, a call turn is still trained through the
    token that closes plain replies (<|im_end|>), not cut at </tool_call>."""
    import copy

    special = copy.deepcopy(tokenizer)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    record = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
        {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."},
    ]}  # fmt: skip
    cfg = dataset([write(tmp_path / "g.json", [record])], DatasetFormat.SHAREGPT, template=ChatTemplate.CHATML,
                  tool_format=ToolFormat.QWEN)  # fmt: skip
    row = build_data(SftStage(), cfg, special).splits["train"][0]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert trained_text(special, row) == f"{call}<|im_end|>Sunny.<|im_end|>"


# A template that renders calls and results (results as JSON strings, as Llama 3.1's does) but
# takes its tools block from ``tools`` only when ``show_tools`` is set by the test.
CALLS_ONLY = (
    "{% if tools and show_tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'tool' %}{{ m['content'] | tojson }}{% else %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("show_tools", [True, False])
def test_results_as_json_strings_pass_and_ignored_tools_are_refused(tmp_path, tokenizer, show_tools):
    """Results re-encoded with tojson still count as rendered; a template that drops the tools
    list is refused even when every offered tool's name shows up in a call."""
    import copy

    own = copy.deepcopy(tokenizer)
    own.chat_template = CALLS_ONLY.replace("show_tools", "true" if show_tools else "false")
    record = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {}})},
        {"from": "observation", "value": '{"sky": "clear"}'}, {"from": "gpt", "value": "Clear."},
    ], "tools": json.dumps([WEATHER])}  # fmt: skip
    cfg = dataset([write(tmp_path / "g.json", [record])], DatasetFormat.SHAREGPT)
    if show_tools:
        assert trained_text(own, build_data(SftStage(), cfg, own).splits["train"][0]).endswith("Clear.<|im_end|>")
    else:
        with pytest.raises(DataError, match="does not render the offered tools"):
            build_data(SftStage(), cfg, own)


def test_tool_calls_where_they_cannot_be_trained_are_bad_records_and_empty_calls_are_none(tmp_path, tokenizer):
    import copy

    on_user = {"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": "{}"}]},
                            {"role": "assistant", "content": "y"}]}  # fmt: skip
    with pytest.raises(DataError, match=r"unsupported tool call: messages\[0\] \(user\) has tool_calls"):
        build_data(SftStage(), dataset([write(tmp_path / "u.json", [on_user])], DatasetFormat.MESSAGES), tokenizer)
    kto = {"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": "{}"}]},
                        {"role": "assistant", "content": "y"}], "label": True}  # fmt: skip
    kto_cfg = dataset([write(tmp_path / "k.json", [kto])], DatasetFormat.KTO,
                      columns=DatasetColumns(messages="messages", kto_tag="label"))  # fmt: skip
    with pytest.raises(DataError, match=r"unsupported tool call: messages\[0\] \(user\) has tool_calls"):
        build_data(KtoStage(), kto_cfg, tokenizer)
    empty = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo.", "tool_calls": "[]"}]
    }
    row = build_data(SftStage(), dataset([write(tmp_path / "e.json", [empty])], DatasetFormat.MESSAGES),
                     copy.deepcopy(tokenizer)).splits["train"][0]  # fmt: skip
    assert row["input_ids"] == ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Yo.")))


def test_preference_pairs_with_tools_calls_and_results(tmp_path, tokenizer):
    """LLaMA-Factory's ranking layout with tools: a reply may be a call (function_call), and a prompt
    may end with a call's results (observation); the tools turn opens every prompt."""
    import copy

    rome = json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})
    ask = {"from": "human", "value": "Weather in Rome?"}
    records = [
        {"conversations": [ask], "chosen": {"from": "function_call", "value": rome},
         "rejected": {"from": "gpt", "value": "I cannot know."}, "tools": json.dumps([WEATHER])},
        {"conversations": [ask, {"from": "function_call", "value": rome}, {"from": "observation", "value": "sun"}],
         "chosen": {"from": "gpt", "value": "Sunny."}, "rejected": {"from": "gpt", "value": "Rainy."},
         "tools": json.dumps([WEATHER])},
    ]  # fmt: skip
    cfg = dataset([write(tmp_path / "p.json", records)], DatasetFormat.PREFERENCE, template=ChatTemplate.CHATML,
                  columns=DatasetColumns(messages="conversations"), tags=SHAREGPT_TAGS)  # fmt: skip
    first, second = build_data(DpoStage(), cfg, copy.deepcopy(tokenizer)).splits["train"]
    call = call_text("get_weather", {"city": "Rome"})
    assert first["prompt_ids"] == ids(tokenizer, tools_turn([WEATHER]) + chatml(("user", "Weather in Rome?"),
                                                                                generation=True))  # fmt: skip
    assert first["chosen_ids"] == ids(tokenizer, call + "<|im_end|>")
    assert first["rejected_ids"] == ids(tokenizer, "I cannot know.<|im_end|>")
    prompt = chatml(("user", "Weather in Rome?"), ("assistant", call), ("tool", "sun"), generation=True)
    assert second["prompt_ids"] == ids(tokenizer, tools_turn([WEATHER]) + prompt)
    assert second["chosen_ids"] == ids(tokenizer, "Sunny.<|im_end|>")
    # The same call on both sides (its arguments in another order) is no preference; a prompt may not
    # end with a call awaiting results; a reply that is several messages is not cut to its last.
    two = json.dumps({"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}})
    swapped = json.dumps({"name": "get_weather", "arguments": {"unit": "C", "city": "Rome"}})
    same = {**records[0], "chosen": {"from": "function_call", "value": two},
            "rejected": {"from": "function_call", "value": swapped}}  # fmt: skip
    waiting = {**records[1], "conversations": records[1]["conversations"][:2]}
    several = {**records[0], "chosen": [*records[1]["conversations"][1:], {"from": "gpt", "value": "Sunny."}]}
    bad = dataset([write(tmp_path / "b.jsonl", [same, waiting, several], jsonl=True)], DatasetFormat.PREFERENCE,
                  template=ChatTemplate.CHATML, columns=DatasetColumns(messages="conversations"),
                  tags=SHAREGPT_TAGS)  # fmt: skip
    with pytest.raises(DataError) as error:
        build_data(DpoStage(), bad, copy.deepcopy(tokenizer))
    problems = str(error.value)
    assert "b.jsonl:1: chosen equals rejected" in problems
    assert "b.jsonl:2: roles out of order: 'conversations' must end with a human or observation turn" in problems
    assert "b.jsonl:3: malformed reply: 'chosen' holds 3 messages; give the one reply" in problems


def test_kto_completion_may_be_a_tool_call(tmp_path, tokenizer):
    import copy

    openai_call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    record = {"messages": [{"role": "user", "content": "Weather in Rome?"},
                           {"role": "assistant", "content": "", "tool_calls": [openai_call]}],
              "label": True, "tools": [{"type": "function", "function": WEATHER}]}  # fmt: skip
    cfg = dataset([write(tmp_path / "k.json", [record])], DatasetFormat.KTO, template=ChatTemplate.CHATML,
                  columns=DatasetColumns(messages="messages", kto_tag="label"))  # fmt: skip
    (row,) = build_data(KtoStage(), cfg, copy.deepcopy(tokenizer)).splits["train"]
    assert row["prompt_ids"] == ids(tokenizer, tools_turn([WEATHER]) + chatml(("user", "Weather in Rome?"),
                                                                              generation=True))  # fmt: skip
    assert row["completion_ids"] == ids(tokenizer, call_text("get_weather", {"city": "Rome"}) + "<|im_end|>")
    assert row["label"] is True


def test_pretraining_on_tool_calls_keeps_the_tools_and_calls(tmp_path, tokenizer):
    """Continual pre-training on tool-call chats mixed with plain text: each chat document is the
    full rendering (tools turn, calls, results); a template that drops calls is refused."""
    import copy

    record = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
        {"from": "observation", "value": "sun"}, {"from": "gpt", "value": "Sunny."},
    ], "tools": json.dumps([WEATHER])}  # fmt: skip
    chats = [write(tmp_path / "g.json", [record])]
    text = DatasetSource(name="t", format=DatasetFormat.TEXT, train=[write(tmp_path / "t.json", [{"text": "Plain."}])])
    cfg = dataset(chats, DatasetFormat.SHAREGPT, cutoff_len=1024, template=ChatTemplate.CHATML, mixed=[text])
    data = build_data(PretrainStage(), cfg, copy.deepcopy(tokenizer))
    call = call_text("get_weather", {"city": "Rome"})
    document = tools_turn([WEATHER]) + chatml(("user", "Weather?"), ("assistant", call), ("tool", "sun"),
                                              ("assistant", "Sunny."))  # fmt: skip
    eos = tokenizer.eos_token_id
    assert data.splits["train"][0]["input_ids"] == [*ids(tokenizer, document), eos, *ids(tokenizer, "Plain."), eos]
    with pytest.raises(DataError, match="does not render tool calls"):
        build_data(PretrainStage(), dataset(chats, DatasetFormat.SHAREGPT, cutoff_len=1024), copy.deepcopy(tokenizer))


def test_bundled_toolcall_demo_masks_every_call_and_answer(tmp_path, tokenizer):
    """Every sample of demo_toolcall: trained text is exactly its calls and answers, each with <|im_end|>."""
    import copy

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig

    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=["dataset=demo_toolcall"])
    cfg = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path).dataset
    data = build_data(SftStage(), cfg, copy.deepcopy(tokenizer))
    records = json.loads(Path(cfg.train[0]).read_text())
    assert len(data.splits["train"]) == len(records) and data.stats["train"].truncated == 0
    for row, record in zip(data.splits["train"], records, strict=True):
        expected = ""
        for turn in record["conversations"]:
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                expected += call_text(call["name"], call["arguments"]) + "<|im_end|>"
            elif turn["from"] == "gpt":
                expected += turn["value"] + "<|im_end|>"
        assert trained_text(tokenizer, row) == expected


# --- bad records -----------------------------------------------------------------------------------


def test_an_unrelated_tools_field_can_be_left_unread(tmp_path, tokenizer):
    """A "tools" field that holds something else made every record bad, and naming another field
    was refused as a typo: '' leaves an optional column unread."""
    path = write(tmp_path / "d.jsonl", [{**GOOD, "tools": ["calculator"]}] * 2, jsonl=True)
    with pytest.raises(DataError, match=r"is not a function schema with a name; if that field is not the tools "
                                        r"offered, dataset.columns.tools='' leaves it unread"):  # fmt: skip
        build_data(SftStage(), dataset([path], DatasetFormat.MESSAGES), tokenizer)
    data = build_data(SftStage(), dataset([path], DatasetFormat.MESSAGES, columns=DatasetColumns(tools="")), tokenizer)
    assert data.stats["train"].kept == 2
    with pytest.raises(DataError, match=r"no field '' for dataset.format=messages"):  # a required one may not
        build_data(SftStage(), dataset([path], DatasetFormat.MESSAGES, columns=DatasetColumns(messages="")), tokenizer)


@pytest.mark.parametrize(
    ("fmt", "columns", "message"),
    [
        (DatasetFormat.MESSAGES, DatasetColumns(messages="dialog"),
         "no field 'dialog' for dataset.format=messages (found: messages, sys); "
         "map yours with dataset.columns.<key>=<field>"),
        # a mapped optional column (a typo) would silently drop its text: refused too
        (DatasetFormat.MESSAGES, DatasetColumns(system="sytem"),
         "no field named by dataset.columns.system=sytem (found: messages, sys)"),
        (DatasetFormat.ALPACA, DatasetColumns(prompt="messages", response="sys", query="nosuch", history="past"),
         "no field named by dataset.columns.query=nosuch, dataset.columns.history=past (found: messages, sys)"),
    ],
)  # fmt: skip
def test_a_field_the_config_names_must_be_in_the_file(tmp_path, tokenizer, fmt, columns, message):
    path = write(tmp_path / "d.jsonl", [{**GOOD, "sys": "Be brief."}], jsonl=True)
    with pytest.raises(DataError) as err:
        build_data(SftStage(), dataset([path], fmt, columns=columns), tokenizer)
    assert str(err.value) == f"{path}: {message}"


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
BAD_RECORDS = [
    ("missing field", DatasetFormat.MESSAGES, {"msgs": []}, "no 'messages'"),
    ("unknown role", DatasetFormat.MESSAGES,
     {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role='robot'"),
    ("unknown role", DatasetFormat.MESSAGES,  # (a TypeError traceback, even with on_error=skip)
     {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]}, "role=['user']"),
    ("empty content", DatasetFormat.MESSAGES,
     {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}, "has no text"),
    # the key dataset.tags names is not in the message (a typo in tags, or another format's file)
    ("no role key", DatasetFormat.MESSAGES, {"messages": [{"from": "human", "content": "x"}]},
     "messages[0] has no 'role' (dataset.tags.role_tag); its keys: 'from', 'content'"),
    ("no content key", DatasetFormat.MESSAGES, {"messages": [{"role": "user", "value": "x"}]},
     "messages[0] has no 'content' (dataset.tags.content_tag); its keys: 'role', 'value'"),
    ("roles out of order", DatasetFormat.MESSAGES,
     {"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]},
     "messages[0] is assistant, expected user"),
    ("roles out of order", DatasetFormat.MESSAGES,
     {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "y"}]},
     "messages[1] is tool, expected assistant"),
    ("malformed tool call", DatasetFormat.MESSAGES,
     {"messages": [{"role": "user", "content": "x"}, {"role": "function_call", "content": "{get_weather"}]},
     "messages[1] is not JSON"),
    ("malformed tools", DatasetFormat.MESSAGES, {**GOOD, "tools": '{"name": "f"}'},
     "must be a list of function schemas"),
    ("chosen equals rejected", DatasetFormat.PREFERENCE, {"prompt": "Q", "chosen": "A", "rejected": "A"}, ""),
    ("label not a boolean", DatasetFormat.KTO, {"prompt": "Q", "completion": "A", "label": "yes"}, "'yes'"),
    ("roles out of order", DatasetFormat.PREFERENCE,
     {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "B",
      "rejected": "C"}, "'prompt' must end with a user or tool turn"),
    ("empty content", DatasetFormat.ALPACA, {"instruction": " ", "input": "", "output": "A"},
     "'instruction' is empty"),
    # LLaMA-Factory's mllm_demo: the images were dropped, and "<image>" trained as text
    ("holds images", DatasetFormat.MESSAGES,
     {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane."}],
      "images": ["mllm_demo_data/1.jpg"]}, "field 'images' (a list): the text models sala-train trains would not"),
    ("holds videos", DatasetFormat.ALPACA, {"instruction": "<video>What?", "output": "A", "videos": ["1.mp4"]},
     "their placeholders would train as text"),
]  # fmt: skip
GOOD_OF = {
    DatasetFormat.ALPACA: {"instruction": "Q", "output": "A"},
    DatasetFormat.MESSAGES: GOOD,
    DatasetFormat.PREFERENCE: {"prompt": "Q", "chosen": "A", "rejected": "B"},
    DatasetFormat.KTO: {"prompt": "Q", "completion": "A", "label": True},
}
STAGE_OF = {DatasetFormat.ALPACA: SftStage(), DatasetFormat.MESSAGES: SftStage(), DatasetFormat.PREFERENCE: DpoStage(),
            DatasetFormat.KTO: KtoStage()}  # fmt: skip


@pytest.mark.parametrize(("reason", "fmt", "bad", "detail"), BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_named_by_line_or_skipped(tmp_path, tokenizer, reason, fmt, bad, detail):
    good = GOOD_OF[fmt]
    files = [write(tmp_path / "d.jsonl", [good, bad, good], jsonl=True)]
    with pytest.raises(DataError) as err:
        build_data(STAGE_OF[fmt], dataset(files, fmt), tokenizer)
    text = str(err.value)
    assert f"dataset.train: 1 bad record(s) (1 {reason})" in text and "on_error=skip" in text
    assert f"d.jsonl:2: {reason}" in text and detail in text
    skipped = build_data(STAGE_OF[fmt], dataset(files, fmt, on_error=OnError.SKIP), tokenizer)
    assert len(skipped.splits["train"]) == 2 and skipped.stats["train"].dropped == {f"bad record: {reason}": 1}


def test_a_record_with_no_media_in_a_media_field_is_text(tmp_path, tokenizer):
    """A file that mixes text records into multimodal ones gives them null or []."""
    files = [write(tmp_path / "m.jsonl", [{**GOOD, "images": []}, {**GOOD, "images": None, "videos": []}], jsonl=True)]
    assert len(build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES), tokenizer).splits["train"]) == 2


def test_an_empty_system_prompt_opening_a_conversation_is_none(tmp_path, tokenizer):
    """OpenAI-style exports open with {"role": "system", "content": ""}: refused as a bad record
    (the conversation lost with on_error=skip), while a blank alpaca system column meant no system
    prompt. Both are none now; a blank system turn anywhere else is still out of order, and
    problems keep the file's numbering."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    blanks = [[{"role": "system", "content": c}, *turns] for c in ("", "   ", "\n", None)]
    records = [{"messages": m} for m in [turns, *blanks]]
    built = build_data(SftStage(), dataset([write(tmp_path / "m.json", records)], DatasetFormat.MESSAGES), tokenizer)
    rows = [(r["input_ids"], r["labels"]) for r in built.splits["train"]]
    assert len(rows) == 5 and all(row == rows[0] for row in rows)
    sharegpt = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}]}  # fmt: skip
    cfg = dataset([write(tmp_path / "g.json", [sharegpt])], DatasetFormat.SHAREGPT,
                  columns=DatasetColumns(messages="conversations"), tags=SHAREGPT_TAGS)  # fmt: skip
    assert [(r["input_ids"], r["labels"]) for r in build_data(SftStage(), cfg, tokenizer).splits["train"]] == rows[:1]
    for bad, where in (
        ([*turns, {"role": "system", "content": ""}, *turns], "messages[2] (system) has no text"),
        ([{"role": "system", "content": ""}, turns[1], turns[0]], "messages[1] is assistant"),
    ):
        path = write(tmp_path / "bad.json", [{"messages": bad}])
        with pytest.raises(DataError, match=re.escape(where)):
            build_data(SftStage(), dataset([path], DatasetFormat.MESSAGES), tokenizer)


def test_many_bad_records_reported_first_ten_and_a_count(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "no reply"}]}
    files = [write(tmp_path / "d.json", [GOOD] + [bad] * 25)]
    with pytest.raises(DataError) as err:
        build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES), tokenizer)
    text = str(err.value)
    assert "25 bad record(s)" in text and "d.json: record 2 of the array: " in text and "... and 15 more" in text
    assert text.count("must end with an assistant turn") == 10


# --- mixing data sets (dataset.mix) ---------------------------------------------------------------


def test_mixed_entries_keep_their_own_format_and_join_train_and_validation(tmp_path, tokenizer):
    """alpaca + sharegpt (own tags) + messages, each with its own files; the main entry's val_size
    cuts the mixed train, and a mixed entry's own validation file joins the held-out part."""
    alpaca = [{"instruction": f"Say a{i}.", "input": "", "output": f"a{i}."} for i in range(10)]
    share = [{"conversations": [{"from": "human", "value": f"Say s{i}."}, {"from": "gpt", "value": f"s{i}."}]}
             for i in range(6)]  # fmt: skip
    chat = [{"messages": [{"role": "user", "content": f"Say m{i}."}, {"role": "assistant", "content": f"m{i}."}]}
            for i in range(5)]  # fmt: skip
    cfg = DatasetConfig(name="main", train=[write(tmp_path / "a.json", alpaca)], format=DatasetFormat.ALPACA,
                        val_size=4, mixed=[
        DatasetSource(name="share", train=[write(tmp_path / "s.jsonl", share, jsonl=True)],
                      format=DatasetFormat.SHAREGPT, columns=DatasetColumns(messages="conversations"),
                      tags=SHAREGPT_TAGS, max_samples=3),
        DatasetSource(name="chat", train=[write(tmp_path / "m.json", chat[:4])],
                      validation=[write(tmp_path / "mv.json", chat[4:])]),
    ])  # fmt: skip
    data = build_data(SftStage(), cfg, tokenizer)
    replies = {split: sorted(trained_text(tokenizer, r).removesuffix("<|im_end|>") for r in rows)
               for split, rows in data.splits.items()}  # fmt: skip
    mixed_train = {f"a{i}." for i in range(10)} | {f"s{i}." for i in range(3)} | {f"m{i}." for i in range(4)}
    assert len(replies["train"]) == 17 - 4 and len(replies["validation"]) == 4 + 1
    assert set(replies["train"]) | set(replies["validation"]) == mixed_train | {"m4."}
    assert "m4." in replies["validation"]  # the mixed entry's own validation file
    row = next(r for r in data.splits["train"] if trained_text(tokenizer, r).startswith("s"))
    said = trained_text(tokenizer, row).removesuffix("<|im_end|>")
    assert row["input_ids"] == ids(tokenizer, chatml(("user", f"Say {said}"), ("assistant", said)))


PLAIN_DOCS = [{"text": f"Plain document {i}."} for i in range(3)]


def _text_mixed_with_chat(tmp_path: Path) -> DatasetConfig:
    """Three plain documents, mixed with one alpaca chat sample."""
    chat = [{"instruction": "Hi", "input": "", "output": "Hello."}]
    source = DatasetSource(name="c", train=[write(tmp_path / "c.json", chat)], format=DatasetFormat.ALPACA)
    files = [write(tmp_path / "t.jsonl", PLAIN_DOCS, jsonl=True)]
    return DatasetConfig(name="t", train=files, validation=files, format=DatasetFormat.TEXT, cutoff_len=512,
                         mixed=[source])  # fmt: skip


def test_pretrain_mixes_text_and_chat_documents(tmp_path, tokenizer):
    cfg = _text_mixed_with_chat(tmp_path)
    block = build_data(PretrainStage(), cfg, tokenizer).splits["train"][0]
    eos = tokenizer.eos_token_id
    documents = [
        *(ids(tokenizer, d["text"]) for d in PLAIN_DOCS),
        ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Hello."))),
    ]
    assert block["input_ids"] == [t for doc in documents for t in [*doc, eos]]


def test_pretrain_on_a_chat_format_alone(tmp_path, tokenizer):
    chat = [{"instruction": "Hi", "input": "", "output": "Hello."}] * 2
    files = [write(tmp_path / "c.json", chat)]
    block = build_data(PretrainStage(), dataset(files, DatasetFormat.ALPACA, cutoff_len=512), tokenizer)
    one = [*ids(tokenizer, chatml(("user", "Hi"), ("assistant", "Hello."))), tokenizer.eos_token_id]
    assert block.splits["train"][0]["input_ids"] == one + one


def test_bad_records_of_a_mixed_entry_are_named_by_it(tmp_path, tokenizer):
    good = [{"instruction": "Hi", "input": "", "output": "Hello."}] * 3
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    bad = [{"messages": turns}, {"messages": [turns[0], {"role": "assistant", "content": ""}]}]
    source = DatasetSource(name="other", train=[write(tmp_path / "b.jsonl", bad, jsonl=True)])
    files = [write(tmp_path / "g.json", good)]
    cfg = DatasetConfig(name="t", train=files, format=DatasetFormat.ALPACA, val_size=1, mixed=[source])
    with pytest.raises(DataError, match=r"dataset\.mix\.other\.train: 1 bad record.*set dataset\.on_error=skip"):
        build_data(SftStage(), cfg, tokenizer)
    skipped = build_data(SftStage(), DatasetConfig(**{**vars(cfg), "on_error": OnError.SKIP}), tokenizer)
    assert len(skipped.splits["train"]) == 3 and sum(skipped.stats["train"].dropped.values()) == 1


def test_a_file_whose_every_record_is_skipped_says_why_in_words(tmp_path):
    files = [write(tmp_path / "t.jsonl", [{"messages": 3}, {"messages": "x"}, {"text": "no messages"}], jsonl=True)]
    with pytest.raises(DataError) as refused:
        load_split(dataset(files, DatasetFormat.MESSAGES), "train", OnError.SKIP)
    assert str(refused.value) == "dataset.train: no usable records (2 malformed messages, 1 missing field)"


@pytest.mark.parametrize("strategy", [MixStrategy.INTERLEAVE_UNDER, MixStrategy.INTERLEAVE_OVER])
def test_interleaving_stops_at_the_first_or_the_last_entry_used_up(tmp_path, tokenizer, strategy):
    big = [{"instruction": f"Say b{i}.", "input": "", "output": f"b{i}."} for i in range(12)]
    small = [{"instruction": f"Say s{i}.", "input": "", "output": f"s{i}."} for i in range(3)]
    source = DatasetSource(name="small", train=[write(tmp_path / "s.json", small)], format=DatasetFormat.ALPACA)
    cfg = DatasetConfig(name="big", train=[write(tmp_path / "b.json", big)], validation=[str(tmp_path / "s.json")],
                        format=DatasetFormat.ALPACA, mixed=[source], mix_strategy=strategy,
                        interleave_probs=[0.5, 0.5])  # fmt: skip
    train = build_data(SftStage(), cfg, tokenizer).splits["train"]
    replies = [trained_text(tokenizer, r).removesuffix("<|im_end|>") for r in train]
    from_big = [r for r in replies if r.startswith("b")]
    from_small = [r for r in replies if r.startswith("s")]
    if strategy is MixStrategy.INTERLEAVE_UNDER:  # ends when the small entry runs out
        assert sorted(set(from_small)) == ["s0.", "s1.", "s2."] and len(from_small) == 3 and len(from_big) < 12
        assert replies[-1].startswith("s")
    else:  # ends when the big entry is used up: the small one repeats
        assert sorted(set(from_big)) == sorted(f"b{i}." for i in range(12)) and len(from_big) == 12
        assert len(from_small) > 3 and set(from_small) == {"s0.", "s1.", "s2."}
    assert from_big == sorted(from_big, key=lambda r: int(r[1:-1]))  # each entry keeps its own order


@pytest.mark.parametrize("val_size", [0.25, 5])
def test_oversampled_records_are_never_both_trained_on_and_held_out(tmp_path, tokenizer, val_size):
    """interleave_over repeats the small entry's records: each entry gives its share of the
    validation set before mixing (a fraction of each, or a count shared in proportion)."""
    big = [{"instruction": f"Say b{i}.", "input": "", "output": f"b{i}."} for i in range(16)]
    small = [{"instruction": f"Say s{i}.", "input": "", "output": f"s{i}."} for i in range(4)]
    source = DatasetSource(name="small", train=[write(tmp_path / "s.json", small)], format=DatasetFormat.ALPACA)
    cfg = DatasetConfig(name="big", train=[write(tmp_path / "b.json", big)], format=DatasetFormat.ALPACA,
                        mixed=[source], mix_strategy=MixStrategy.INTERLEAVE_OVER, val_size=val_size)  # fmt: skip
    data = build_data(SftStage(), cfg, tokenizer)
    train, held = ([trained_text(tokenizer, r) for r in data.splits[s]] for s in ("train", "validation"))
    assert not set(train) & set(held)
    assert sorted(r[0] for r in held) == ["b"] * 4 + ["s"]  # 0.25: 4 of 16 and 1 of 4; 5: 4 and 1
    assert {r for r in train if r.startswith("b")} | {r for r in held if r.startswith("b")} == {
        f"b{i}.<|im_end|>" for i in range(16)
    }
    if val_size == 5:  # a count whose share leaves an entry nothing: the message names that entry
        with pytest.raises(DataError, match=r"dataset.val_size=19: dataset.mix.small's train \(each mixed entry "
                                            r"holds out its share of the 20 records\) has only 4 records"):  # fmt: skip
            build_data(SftStage(), dataclasses.replace(cfg, val_size=19), tokenizer)


@pytest.mark.parametrize("val_size", [1, 3])
def test_a_count_held_out_under_oversampling_is_shared_out_whole(tmp_path, tokenizer, val_size):
    """Each entry's part of a count was rounded on its own: 1 over two entries of 12 gave each 0
    (half to even), so the split fell back to the mixed, oversampled records, and the one held out
    was trained on 4 times; 3 over two entries held out 4."""
    a = [{"instruction": f"Say a{i}.", "input": "", "output": f"a{i}."} for i in range(12)]
    b = [{"instruction": f"Say b{i}.", "input": "", "output": f"b{i}."} for i in range(12)]
    source = DatasetSource(name="b", train=[write(tmp_path / "b.json", b)], format=DatasetFormat.ALPACA)
    cfg = DatasetConfig(name="a", train=[write(tmp_path / "a.json", a)], format=DatasetFormat.ALPACA,
                        mixed=[source], mix_strategy=MixStrategy.INTERLEAVE_OVER, interleave_probs=[0.8, 0.2],
                        val_size=val_size)  # fmt: skip
    data = build_data(SftStage(), cfg, tokenizer)
    train, held = ([trained_text(tokenizer, r) for r in data.splits[s]] for s in ("train", "validation"))
    assert len(held) == val_size and not set(train) & set(held)
    tiny = [{"instruction": "Say t.", "input": "", "output": "t."}]
    one = DatasetSource(name="one", train=[write(tmp_path / "t.json", tiny)], format=DatasetFormat.ALPACA)
    lone = dataclasses.replace(cfg, train=[str(tmp_path / "t.json")], mixed=[one])
    with pytest.raises(DataError, match=r"none has 2 records to split \(1, 1\)"):
        build_data(SftStage(), lone, tokenizer)


def test_a_mixed_entry_without_its_fields_says_where_to_map_them(tmp_path, tokenizer):
    """The fix given was dataset.mix.NAME.columns.KEY=FIELD, which the command line refuses: a mixed
    entry's keys are its option file's."""
    rows = [{"instruction": "Say a.", "input": "", "output": "a."}] * 2
    wrong = DatasetSource(name="mine", train=[write(tmp_path / "m.json", [{"question": "q", "answer": "a"}] * 2)],
                          format=DatasetFormat.ALPACA)  # fmt: skip
    cfg = DatasetConfig(name="a", train=[write(tmp_path / "a.json", rows)], validation=[str(tmp_path / "a.json")],
                        format=DatasetFormat.ALPACA, mixed=[wrong])  # fmt: skip
    with pytest.raises(DataError, match=re.escape("map yours under columns: in conf/dataset/mine.yaml (your own in "
                                                  "--config-dir)")):  # fmt: skip
        build_data(SftStage(), cfg, tokenizer)


def test_weights_off_1_by_what_the_check_allows_interleave(tmp_path, tokenizer):
    """Three thirds written 0.3333333 pass the config's check (1e-6) but not numpy's sampler."""
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(4)]
    sources = [DatasetSource(name=n, train=[write(tmp_path / f"{n}.json", rows)], format=DatasetFormat.ALPACA)
               for n in ("b", "c")]  # fmt: skip
    cfg = DatasetConfig(name="a", train=[write(tmp_path / "a.json", rows)], validation=[str(tmp_path / "a.json")],
                        format=DatasetFormat.ALPACA, mixed=sources, mix_strategy=MixStrategy.INTERLEAVE_UNDER,
                        interleave_probs=[0.3333333, 0.3333333, 0.3333333])  # fmt: skip
    assert len(build_data(SftStage(), cfg, tokenizer).splits["train"]) > 0


# --- files as written, and what is wrong with them -------------------------------------------------


def chat(answer, question="Q?") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def answers(files: list[str], fmt: DatasetFormat = DatasetFormat.MESSAGES, **kw) -> list[str]:
    loaded = load_split(dataset(files, fmt, **kw), "train", kw.get("on_error", OnError.FAIL))
    return [messages[-1]["content"] for messages in loaded.records["messages"]]


def test_values_of_mixed_types_arrive_as_written_and_only_odd_ones_are_bad(tmp_path):
    # datasets gives a field of mixed types its Json type and decodes "1" to 1 and "[1, 2]" to a list
    good = [chat(str(i)) for i in range(10)] + [chat("[1, 2]"), chat("1.")]
    listed = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": "hello"}]}  # fmt: skip
    files = [write(tmp_path / "m.jsonl", [*good, listed, chat(7)], jsonl=True)]
    with pytest.raises(DataError) as err:
        answers(files)
    text = str(err.value)
    assert "2 bad record(s) (2 not text)" in text
    assert "m.jsonl:13: not text: messages[0] (user): 'content' is a list, expected text" in text
    assert "m.jsonl:14: not text: messages[1] (assistant): 'content' is a number, expected text" in text
    assert answers(files, on_error=OnError.SKIP) == [r["messages"][1]["content"] for r in good]
    alpaca = [{"instruction": "Add.", "output": "1."}, {"instruction": "Add.", "output": 5}]
    files = [write(tmp_path / "a.jsonl", alpaca, jsonl=True)]
    assert answers(files, DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["1."]
    with pytest.raises(DataError, match=r"a.jsonl:2: not text: 'output' is a number, expected text"):
        answers(files, DatasetFormat.ALPACA)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tmp_path, suffix):
    """A line (JSON lines) or a row (CSV) that is not UTF-8 is a bad record, reported with the
    others or skipped; a CSV row stopped the whole load even under skip."""
    head = json.dumps(chat("fine")) + "\n" if suffix == "jsonl" else "instruction,output\nAdd.,fine\n"
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(head.encode() + b"caf\xe9,ok\n")
    fmt = DatasetFormat.MESSAGES if suffix == "jsonl" else DatasetFormat.ALPACA
    line = 2 if suffix == "jsonl" else 3
    with pytest.raises(DataError, match=rf"\n  \S*latin1\.{suffix}:{line}: not UTF-8: byte 0xe9 at column 4$"):
        answers([str(path)], fmt)
    assert answers([str(path)], fmt, on_error=OnError.SKIP) == ["fine"]


def test_a_csv_row_that_is_not_utf8_is_named_where_its_byte_is(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'instruction,output\nAdd.,1\n"Say\nd\xe9j\xe0 vu",2\nAdd.,3\n')
    with pytest.raises(DataError) as refused:
        answers([str(path)], DatasetFormat.ALPACA)
    assert str(refused.value).splitlines()[1:] == [f"  {path}:3: not UTF-8: byte 0xe9 at line 4, column 2"]
    assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["1", "3"]
    # A header that is not UTF-8 spoils the whole file: no record can be read by its names.
    path.write_bytes(b"instr\xfcction,output\nAdd.,1\n")
    with pytest.raises(DataError, match=r"rows.csv:1: not valid UTF-8 \(byte 0xfc at column 6\)"):
        answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_columns_named_like_the_json_readers_are_data(tmp_path, suffix):
    """A CSV or Parquet column named _record, _bad or _at was taken for the JSON reader's own:
    _record a traceback, _bad a bad record of that text, _at the record's location."""
    import pandas

    rows = pandas.DataFrame({"instruction": ["Add."] * 3, "output": ["1", "2", ""], "_record": ["x", "y", "z"],
                             "_bad": ["x\ty", "z", ""], "_at": ["here", "there", "nowhere"]})  # fmt: skip
    path = tmp_path / f"cols.{suffix}"
    rows.to_csv(path, index=False) if suffix == "csv" else rows.to_parquet(path)
    assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["1", "2"]
    with pytest.raises(DataError) as refused:
        answers([str(path)], DatasetFormat.ALPACA)
    where = f"{path}:4" if suffix == "csv" else f"{path}: record 3"
    assert str(refused.value).splitlines()[1:] == [f"  {where}: empty content: 'output' is empty"]


def test_malformed_json_lines_are_bad_records_reported_together_or_skipped(tmp_path):
    """A malformed line stopped the load at the first, whatever dataset.on_error said (the README
    lists malformed JSON among the bad records skip drops); its column was 1 of the next line."""
    good = [json.dumps(chat(str(i))) for i in range(3)]
    cut = json.dumps(chat("cut short"))[:-1]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([good[0], cut, good[1], "{not json", good[2]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as refused:
        answers([str(path)])
    assert str(refused.value).splitlines() == [
        "dataset.train: 2 bad record(s) (2 malformed JSON line); fix them or set dataset.on_error=skip:",
        f"  {path}:2: malformed JSON line: Expecting ',' delimiter (column {len(cut) + 1})",
        f"  {path}:4: malformed JSON line: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert answers([str(path)], on_error=OnError.SKIP) == ["0", "1", "2"]
    # A file of one line, cut short: that line is the bad record (it was an IndexError traceback).
    single = tmp_path / "one.jsonl"
    single.write_text(cut + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"\n  {single}:1: malformed JSON line: Expecting ',' delimiter"):
        answers([str(single)])
    # One pretty-printed object with a byte that is not UTF-8: the file's problem, located.
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_bytes(json.dumps(chat("caf\u00e9"), indent=2, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{pretty}:\d+: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        answers([str(pretty)], on_error=OnError.SKIP)


def test_max_samples_takes_the_first_records_as_written_before_they_are_checked(tmp_path):
    """It was applied after the check: a bad record past the cap failed the run, and under skip
    the cap counted good records only (the first N good ones, wherever they were)."""
    bad = {"messages": [{"role": "user", "content": "no reply"}]}
    first = write(tmp_path / "a.jsonl", [chat("0"), bad, chat("2")], jsonl=True)
    second = write(tmp_path / "b.jsonl", [bad, chat("4")], jsonl=True)
    assert answers([first], max_samples=1) == ["0"]  # (the bad record 2 is past the cap: not read)
    with pytest.raises(DataError, match=r"1 bad record\(s\).*\n  \S*a.jsonl:2: "):
        answers([first, second], max_samples=2)
    loaded = load_split(dataset([first, second], DatasetFormat.MESSAGES, max_samples=4), "train", OnError.SKIP)
    assert [m[-1]["content"] for m in loaded.records["messages"]] == ["0", "2"] and sum(loaded.dropped.values()) == 2


def test_a_val_size_fraction_that_leaves_no_train_record_is_refused(tmp_path):
    files = [write(tmp_path / "m.jsonl", [chat(str(i)) for i in range(20)], jsonl=True)]
    cfg = DatasetConfig(name="t", train=files, val_size=0.999, format=DatasetFormat.MESSAGES)
    with pytest.raises(DataError, match=r"dataset.val_size=0.999: train has only 20 records, and holding out 20"):
        raw_splits(cfg)
    cfg = DatasetConfig(name="t", train=files, val_size=0.5, format=DatasetFormat.MESSAGES)
    assert [len(s.records) for s in raw_splits(cfg).values()] == [10, 10]


def test_csv_with_a_byte_order_mark_and_quoted_lines_is_read_and_located_by_line(tmp_path):
    path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8"; the second record spans lines 3-4
    path.write_text('instruction,output\nAdd.,2\n"Two\nlines",4\nEmpty.,\nLast.,5\n', encoding="utf-8-sig")
    with pytest.raises(DataError, match=r"excel.csv:5: empty content: 'output' is empty"):
        answers([str(path)], DatasetFormat.ALPACA)
    assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["2", "4", "5"]


def test_csv_with_lines_ending_in_cr_alone_or_a_line_break_in_a_header_name_is_read(tmp_path):
    """Excel's "CSV (Macintosh)" ends lines in \\r alone: the header was read as the file's first
    line of bytes (the whole file), a csv.Error traceback; a quoted header name with a line break
    was cut at it ('Field "instr\\n" does not exist')."""
    text = 'instruction,output\nAdd.,2\n"Two\nlines",4\n'
    (tmp_path / "lf.csv").write_text(text, encoding="utf-8")
    (tmp_path / "cr.csv").write_bytes(text.replace("\n", "\r").encode())
    assert answers([str(tmp_path / "cr.csv")], DatasetFormat.ALPACA) == ["2", "4"]
    assert answers([str(tmp_path / "lf.csv")], DatasetFormat.ALPACA) == ["2", "4"]
    (tmp_path / "named.csv").write_text('"the\ninstruction",output\nAdd.,2\n', encoding="utf-8")
    loaded = load_split(dataset([str(tmp_path / "named.csv")], DatasetFormat.ALPACA,
                                columns=DatasetColumns(prompt="the\ninstruction")), "train", OnError.FAIL)  # fmt: skip
    assert [m[-1]["content"] for m in loaded.records["messages"]] == ["2"]


def test_hidden_files_and_directories_are_skipped(tmp_path):
    folder = tmp_path / "data"
    for hidden in (".ipynb_checkpoints/m.jsonl", ".cache/x/m.jsonl", ".m.jsonl"):
        (folder / hidden).parent.mkdir(parents=True, exist_ok=True)
        (folder / hidden).write_text("{broken\n")
    write(folder / "m.jsonl", [chat("one")], jsonl=True)
    assert answers([str(folder)]) == ["one"]


def test_linked_folders_are_read_once_and_a_pipe_among_the_data_is_named(tmp_path):
    """A linked folder's files were left out without a word (os.walk does not follow links by
    default; a folder holding only a link was "no data files"); a named pipe was passed over."""
    import os

    folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    write(folder / "m.jsonl", [chat("one")], jsonl=True)
    write(elsewhere / "n.jsonl", [chat("two")], jsonl=True)
    (folder / "linked").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(folder)  # a loop: each real folder is read once
    assert sorted(answers([str(folder)])) == ["one", "two"]
    only_a_link = tmp_path / "only"
    only_a_link.mkdir()
    (only_a_link / "linked").symlink_to(elsewhere)
    assert sorted(answers([str(only_a_link)])) == ["one", "two"]
    # Two links to one folder: the first by name is read, whatever order the links were made in.
    from sala_train.data.formats import expand_paths

    (only_a_link / "a_alias").symlink_to(elsewhere)
    assert expand_paths([str(only_a_link)], "train") == [only_a_link / "a_alias/back/m.jsonl",
                                                        only_a_link / "a_alias/n.jsonl"]  # fmt: skip
    # A link up to a folder holding the data would read everything there: refused, named.
    (only_a_link / "up").symlink_to(tmp_path)
    with pytest.raises(DataError, match=rf"^dataset.train\[0\]: {only_a_link}/up is a link to {tmp_path}, a folder"):
        expand_paths([str(only_a_link)], "train")
    os.mkfifo(folder / "pipe.jsonl")
    with pytest.raises(DataError, match=rf"^dataset.train\[0\]: {folder}/pipe.jsonl: not a regular file$"):
        answers([str(folder)])


def test_a_folder_of_the_data_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """Path.rglob passed over a folder it could not list: its files were left out without a word, or
    the directory said to hold no data files. (Root lists every folder, so the refusal is made here.)"""
    import os

    from sala_train.data.formats import expand_paths

    folder = tmp_path / "data"
    for sub in ("locked", "more"):
        (folder / sub).mkdir(parents=True)
    write(folder / "m.jsonl", [chat("one")], jsonl=True)
    write(folder / "locked" / "n.jsonl", [chat("two")], jsonl=True)
    write(folder / "more" / "o.jsonl", [chat("three")], jsonl=True)
    assert expand_paths([str(folder)], "train") == [
        folder / "locked/n.jsonl",
        folder / "m.jsonl",
        folder / "more/o.jsonl",
    ]
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=rf"^dataset.train\[0\]: cannot list {folder}/locked \(Permission denied\)$"):
        expand_paths([str(folder)], "train")


def test_csv_rows_with_more_cells_than_the_header_are_bad_records(tmp_path, capfd):
    """They stopped the load at the first, whatever dataset.on_error said."""
    path = tmp_path / "ragged.csv"
    # (pandas skips a line of blanks: the lines after it were named one line early)
    path.write_text('instruction,output\nAdd.,2\n  \nAdd.,3,extra,cells\n"Say\nit",4\nAdd.,5,x\n\nAdd.,6\n')
    with pytest.raises(DataError) as refused:
        answers([str(path)], DatasetFormat.ALPACA)
    assert str(refused.value).splitlines() == [
        "dataset.train: 2 bad record(s) (2 more cells than the header); fix them or set dataset.on_error=skip:",
        f"  {path}:4: more cells than the header: 4 where the header has 2",
        f"  {path}:7: more cells than the header: 3 where the header has 2",
    ]
    assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["2", "4", "6"]
    assert "Failed to" not in capfd.readouterr().err
    # Every row one cell too many: pandas read the first as the index and shifted the others, so
    # the output was read as the instruction and the answer trained was the instruction's neighbour.
    path.write_text("instruction,output\nTranslate to French,hello,bonjour\nTranslate to French,cat,chat\n")
    with pytest.raises(DataError, match=r"\n  \S*ragged.csv:2: more cells than the header: 3 where the header has 2\n"):
        answers([str(path)], DatasetFormat.ALPACA)
    with pytest.raises(DataError, match=r"no usable records \(2 more cells than the header\)"):
        answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP)
    # No row long (pandas' own reading): a bad record after a line of blanks is named on its line.
    path.write_text("instruction,output\nAdd.,1\n \t \nAdd.,\n")
    with pytest.raises(DataError, match=r"\n  \S*ragged.csv:4: empty content: 'output' is empty$"):
        answers([str(path)], DatasetFormat.ALPACA)
    # What pandas' C reader skips is a line of spaces and tabs alone; a quoted blank cell, or a
    # line of other blanks (a no-break space), is a record to it (they were skipped, so the bad
    # records after them were named a line early, and the last one was an IndexError traceback).
    for line in ('""', '" "', "\u00a0"):
        path.write_text(f"instruction,output\nAdd.,1\n{line}\nAdd.,\n", encoding="utf-8")
        with pytest.raises(DataError) as refused:
            answers([str(path)], DatasetFormat.ALPACA)
        empty = [f"  {path}:{n}: empty content: 'output' is empty" for n in (3, 4)]
        assert str(refused.value).splitlines()[1:] == empty, line
        # Its python reader, which reads a file with long rows, skips them: rows stay in step.
        path.write_text(f"instruction,output\nAdd.,1,x\n{line}\nAdd.,2\n", encoding="utf-8")
        assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["2"], line
    # A cell with text after its closing quote: pandas' python reader drops that row, so the rows
    # are out of step; the long row is named (it was a count of records, and no line).
    path.write_text('instruction,output\nName the film.,"Casablanca" (1942)\nAdd.,2,x\nAdd.,3\n')
    with pytest.raises(DataError, match=r"ragged.csv:3: more cells than the header: 3 where the header has 2; pandas "
                                        r"does not read this file's rows in step"):  # fmt: skip
        answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP)
    # Only the first row long: still a bad record, the rest read in their columns.
    path.write_text("instruction,output\nAdd.,1,x\nAdd.,2\n")
    assert answers([str(path)], DatasetFormat.ALPACA, on_error=OnError.SKIP) == ["2"]
    assert "ParserWarning" not in capfd.readouterr().err
    # A table saved by pandas with its index (an unnamed first column): datasets' own words were
    # "An error occurred while generating the dataset".
    path.write_text(",instruction,input,output\n0,Add.,,2\n")
    with pytest.raises(DataError, match=r"ragged.csv:1: column 1 of the header has no name \(a table saved with"):
        answers([str(path)], DatasetFormat.ALPACA)
    # A cell past the csv module's 128 KiB default (pandas has no limit): read, not a traceback.
    path.write_text(f"instruction,output\nSummarise.,{'x' * 200_000}\nAdd.,2\n")
    assert answers([str(path)], DatasetFormat.ALPACA) == ["x" * 200_000, "2"]
    # An unclosed quote: pandas named its own row count ("EOF inside string starting at row 1").
    path.write_text('instruction,input,output\nAdd.,,2\n\n"unterminated,x,y\nz,w,v\n')
    with pytest.raises(DataError, match=r"ragged.csv:4: a cell opens a quote \(\"\) that is never closed$"):
        answers([str(path)], DatasetFormat.ALPACA)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("blank.jsonl", "\n\n  \n", "blank.jsonl: no records"),
        ("header.csv", "instruction,output\n", r"header.csv: no records \(only a header\)"),
        ("empty.json", "[]", r"empty.json: no records \(an empty JSON array\)"),
        ("line.jsonl", json.dumps(chat("a")) + "\n42\n", r"line.jsonl:2: not a JSON object: found a number"),
        ("scalar.json", "42", r"scalar.json:1: not a JSON object: found a number"),
        ("nulls.json", json.dumps([chat("a"), None]), r"nulls.json: record 2 of the array: not a JSON object"),
        ("half.jsonl", json.dumps(chat("a")) + "\n" + json.dumps(chat("x")).replace("x", "\\ud83d") + "\n",
         r"half.jsonl:2: not text: a \\u escape is half of a surrogate pair"),
    ],
)  # fmt: skip
def test_files_without_records_or_with_non_objects_say_so(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    fmt = DatasetFormat.ALPACA if name.endswith(".csv") else DatasetFormat.MESSAGES
    with pytest.raises(DataError, match=message):
        answers([str(tmp_path / name)], fmt)
    if name in ("line.jsonl", "nulls.json", "half.jsonl"):  # one bad record among good ones: skip drops it alone
        assert answers([str(tmp_path / name)], fmt, on_error=OnError.SKIP) == ["a"]


def test_an_empty_parquet_and_a_dangling_data_link_say_so(tmp_path):
    """A Parquet file with a schema and no rows gave datasets' "BatchSize must be greater than 0";
    a data file in a directory linking nowhere (the data moved) was left out without a word."""
    import datasets

    datasets.Dataset.from_list([chat("a")]).select([]).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"none.parquet: no records$"):
        answers([str(tmp_path / "none.parquet")])
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "m.jsonl", [chat("one")], jsonl=True)
    (folder / "moved.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(DataError, match=r"data/moved.jsonl is a link to .*elsewhere.jsonl, which does not exist"):
        answers([str(folder)])
    (folder / "moved.jsonl").unlink()
    (folder / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not a data file: as any other, not read
    assert answers([str(folder)]) == ["one"]


def test_records_of_arrays_and_parquet_are_numbered_from_one(tmp_path):
    import datasets

    records = [chat("a"), chat("b"), chat(" ")]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "m.parquet"))
    for name in ("m.json", "m.parquet"):
        if name == "m.json":
            write(tmp_path / name, records)
        with pytest.raises(DataError) as err:
            answers([str(tmp_path / name)])
        where = "record 3 of the array" if name == "m.json" else "record 3"
        assert f"{name}: {where}: empty content" in str(err.value)


@pytest.mark.parametrize("answer", ["two", "twoo"])  # the same size, and another size
def test_a_file_changed_under_the_same_mtime_is_read_again(tmp_path, answer):
    import os

    for suffix in ("jsonl", "csv"):
        path = tmp_path / f"m.{suffix}"
        fmt = DatasetFormat.MESSAGES if suffix == "jsonl" else DatasetFormat.ALPACA

        def put(text: str, path: Path = path, suffix: str = suffix) -> None:
            path.write_text(json.dumps(chat(text)) + "\n" if suffix == "jsonl" else f"instruction,output\nQ,{text}\n")

        put("one")
        stat = path.stat()
        assert answers([str(path)], fmt) == ["one"]
        put(answer)  # as cp -p or rsync -t leave it: the old mtime
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert answers([str(path)], fmt) == [answer]


def test_sharegpt_order_errors_name_the_files_own_roles(tmp_path):
    record = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                       {"from": "human", "value": "Hi again"}]}  # fmt: skip
    files = [write(tmp_path / "s.jsonl", [record], jsonl=True)]
    with pytest.raises(DataError, match=r"conversations\[1\] is human, expected gpt"):
        answers(files, DatasetFormat.SHAREGPT)
    record["conversations"] = [{"from": "human", "value": "Hi"}]
    files = [write(tmp_path / "s.jsonl", [record], jsonl=True)]
    with pytest.raises(DataError, match=r"'conversations' must end with a gpt turn"):
        answers(files, DatasetFormat.SHAREGPT)


def test_long_texts_tokenize_without_transformers_indexing_warning(capfd):
    """sala-train tokenizes whole texts and cuts them at dataset.cutoff_len (checked against the
    model's positions): transformers' "will result in indexing errors" warning would only mislead."""
    from sala_train.config.schema import ModelConfig
    from sala_train.models import load_tokenizer
    from tests.conftest import TINY_CHAT

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(TINY_CHAT)))
    ids = tokenizer("word " * (tokenizer.model_max_length + 10))["input_ids"]
    assert len(ids) > tokenizer.model_max_length
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_a_conversation_the_template_refuses_is_skipped_with_on_error_skip(tmp_path, tokenizer):
    """Gemma-style templates refuse system turns: that record fails the build, or with
    dataset.on_error=skip is dropped and counted, as other bad records are."""
    tok = copy.deepcopy(tokenizer)
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tok.chat_template = refuse + tok.chat_template
    system = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
    files = [write(tmp_path / "d.jsonl", [GOOD, system, GOOD], jsonl=True)]
    with pytest.raises(DataError, match="System role not supported; fix the tokenizer's template"):
        build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES), tok)
    skipped = build_data(SftStage(), dataset(files, DatasetFormat.MESSAGES, on_error=OnError.SKIP), tok)
    assert len(skipped.splits["train"]) == 2
    assert skipped.stats["train"].dropped == {"the chat template refused it (dataset.on_error=skip)": 1}
    # Every one refused: a longer cutoff_len (the advice before) would not help.
    only_system = [write(tmp_path / "s.jsonl", [system, system], jsonl=True)]
    with pytest.raises(
        DataError, match=r"\); use a chat template that takes these conversations \(dataset.template\)$"
    ):
        build_data(SftStage(), dataset(only_system, DatasetFormat.MESSAGES, on_error=OnError.SKIP), tok)
    # Continual pre-training renders conversations with the same template: the same rule.
    with pytest.raises(DataError, match="System role not supported"):
        build_data(PretrainStage(), dataset(files, DatasetFormat.MESSAGES), tok)
    documents = build_data(PretrainStage(), dataset(files, DatasetFormat.MESSAGES, on_error=OnError.SKIP), tok)
    assert documents.stats["train"].dropped == {"the chat template refused it (dataset.on_error=skip)": 1}
    good_only = build_data(PretrainStage(), dataset([write(tmp_path / "g.jsonl", [GOOD, GOOD], jsonl=True)],
                                                    DatasetFormat.MESSAGES), tok)  # fmt: skip
    assert documents.splits["train"]["input_ids"] == good_only.splits["train"]["input_ids"]
    pairs = [write(tmp_path / "p.jsonl", [{"prompt": [system["messages"][0], {"role": "user", "content": "Q"}],
                                           "chosen": "A", "rejected": "B"}, GOOD_OF[DatasetFormat.PREFERENCE]],
                   jsonl=True)]  # fmt: skip
    dpo = build_data(DpoStage(), dataset(pairs, DatasetFormat.PREFERENCE, on_error=OnError.SKIP), tok)
    assert len(dpo.splits["train"]) == 1 and sum(dpo.stats["train"].dropped.values()) == 1


def test_replies_with_unfilled_placeholders_are_said(tmp_path):
    """LLaMA-Factory's identity.json ships its replies with {{name}} and {{author}} to fill in (85 of
    its 91 outputs hold one, counted with json and re alone);
    trained as they are, the model learns to call itself "{{name}}" (said by nothing before). Said
    for the file alone and mixed into a larger set; a few templates meant literally are not."""
    from sala_train.data.placeholders import unfilled_placeholders_warning

    identity = load_split(dataset([str(needs(LF_DATA / "identity.json"))], DatasetFormat.ALPACA), "train",
                          OnError.FAIL).records  # fmt: skip
    warning = unfilled_placeholders_warning(identity)
    said = "WARNING: the replies of 85 of 91 train records hold {{author}} or {{name}}, placeholders never filled in"
    assert warning is not None and warning.startswith(said)
    plain = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(900)]
    mixed = load_split(dataset([write(tmp_path / "p.json", plain), str(LF_DATA / "identity.json")],
                               DatasetFormat.ALPACA), "train", OnError.FAIL).records  # fmt: skip
    assert "85 of 991 train records hold {{author}} or {{name}}" in (unfilled_placeholders_warning(mixed) or "")
    # (read a batch at a time, as a large split is: its records counted by their place in the split)
    import pytest

    import sala_train.data.placeholders as placeholders
    from sala_train.data.records import arrow_batches

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placeholders, "arrow_batches", lambda split: arrow_batches(split, rows=10))
        assert unfilled_placeholders_warning(mixed) == warning.replace(" 91 ", " 991 ")
    code = plain[:97] + [{"instruction": "A Jinja greeting", "output": "Hello {{ user }}!"}] * 3
    chats = [
        {"messages": [{"role": "user", "content": "{{q}}"}, {"role": "assistant", "content": r["output"]}]}
        for r in code
    ]  # fmt: skip (a prompt's placeholder is not a reply's)
    for records in (code, chats):
        fmt = DatasetFormat.MESSAGES if "messages" in records[0] else DatasetFormat.ALPACA
        loaded = load_split(dataset([write(tmp_path / "c.json", records)], fmt), "train", OnError.FAIL).records
        assert unfilled_placeholders_warning(loaded) is None
    many = chats[:90] + chats[-1:] * 10  # (ten replies: said, whatever the set's size)
    loaded = load_split(dataset([write(tmp_path / "m.json", many)], DatasetFormat.MESSAGES), "train", OnError.FAIL)
    assert "the replies of 10 of 100 train records hold {{user}}" in (
        unfilled_placeholders_warning(loaded.records) or ""
    )


def test_a_compressed_data_file_is_refused_not_left_out_and_ndjson_is_json_lines(tmp_path, tokenizer):
    """A folder's ``b.jsonl.gz`` was passed over without a word (its records missing from the run);
    ``.ndjson`` files, JSON lines by another name, were too."""
    import gzip

    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", [good] * 3, jsonl=True)
    write(folder / "c.ndjson", [good] * 2, jsonl=True)
    assert len(raw_splits(dataset([str(folder)], DatasetFormat.MESSAGES))["train"].records) == 5
    (folder / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps(good) + "\n").encode()))
    for named in (folder, folder / "b.jsonl.gz"):
        with pytest.raises(DataError, match=r"b.jsonl.gz is compressed, which sala-train does not read; decompress"):
            raw_splits(dataset([str(named)], DatasetFormat.MESSAGES))


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf16_json_file_is_one_message(tmp_path, suffix):
    """Saved as UTF-16 (Notepad's "Unicode"): every line was a bad record (20 malformed JSON line,
    1 not UTF-8), or a JSON array one record, which on_error=skip dropped as one."""
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    text = json.dumps([good, good]) if suffix == ".json" else f"{json.dumps(good)}\n{json.dumps(good)}\n"
    path = tmp_path / f"d{suffix}"
    path.write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match=r"d.jsonl?: the file is UTF-16 \(Notepad's \"Unicode\"\), not UTF-8; save"):
        raw_splits(dataset([str(path)], DatasetFormat.MESSAGES, on_error=OnError.SKIP))


def test_a_semicolon_separated_csv_is_named_as_such(tmp_path):
    """Excel in many locales saves CSV with ';': the file was said to lack its fields, and told to
    map them, its one column being 'instruction;input;output'."""
    path = tmp_path / "d.csv"
    path.write_text("instruction;input;output\nAdd.;2 + 2;4.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv: its columns are separated by ';' \(instruction;input;output\); only"):
        raw_splits(dataset([str(path)], DatasetFormat.ALPACA))


def test_no_bundled_demo_validation_record_is_also_a_training_record():
    """demo_alpaca's validation set held 6 of its training records (demo_toolcall 8): its eval loss
    was partly measured on data the run trained on."""
    from tests.conftest import TINY_CHAT

    def records(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
        return [json.dumps(row, sort_keys=True) for row in rows]

    sets = [d for d in (TINY_CHAT.parents[1] / "data").iterdir() if d.is_dir() and d.name.startswith("demo_")]
    assert len(sets) >= 7
    for folder in sets:
        (train,), (validation,) = (list(folder.glob(f"{split}.json*")) for split in ("train", "validation"))
        assert not set(records(train)) & set(records(validation)), folder.name
