"""Reading files into tokenized splits: formats, truncation and dropping, errors, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sala_train.config.schema import DatasetConfig, DatasetSource, SftStage
from sala_train.data.build import DROP_NO_TRAINED, build_data
from sala_train.data.chat import IGNORE_INDEX, encode
from sala_train.data.collators import PadToLongestCollator
from sala_train.errors import DataError
from tests.conftest import TINY_CHAT

SHORT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
LONG = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
        {"role": "user", "content": "Count from 1 to 5."},
        {"role": "assistant", "content": "1, 2, 3, 4, 5."},
    ]
}


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_array(path: Path, records: list) -> str:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return str(path)


def config(train: str, validation: str | None = None, **kw) -> DatasetConfig:
    return DatasetConfig(name="t", train=[train], validation=[validation] if validation else None, **kw)


def test_json_array_and_jsonl_both_load(tmp_path, tokenizer):
    train = write_array(tmp_path / "train.json", [SHORT, LONG])
    val = write_jsonl(tmp_path / "val.jsonl", [SHORT])
    data = build_data(SftStage(), config(train, val, cutoff_len=4096), tokenizer)
    assert len(data.splits["train"]) == 2 and len(data.splits["validation"]) == 1
    row = data.splits["train"][1]
    want = encode(tokenizer, LONG["messages"], 4096)
    assert row["input_ids"] == want.input_ids and row["labels"] == want.labels


def test_sample_without_trained_tokens_after_cutoff_is_dropped_and_counted(tmp_path, tokenizer):
    cutoff = 40  # LONG's system prompt alone is longer; SHORT fits whole
    assert len(encode(tokenizer, LONG["messages"], 10_000).input_ids) > cutoff
    assert encode(tokenizer, LONG["messages"], cutoff).trained_tokens == 0
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG, SHORT])
    val = write_jsonl(tmp_path / "val.jsonl", [SHORT])
    data = build_data(SftStage(), config(train, val, cutoff_len=cutoff), tokenizer)
    stats = data.stats["train"]
    assert stats.kept == 2 and stats.dropped == {DROP_NO_TRAINED: 1}
    for row in data.splits["train"]:
        assert len(row["input_ids"]) <= cutoff
        assert any(label != IGNORE_INDEX for label in row["labels"])


def test_truncated_sample_with_trained_tokens_is_kept(tmp_path, tokenizer):
    full = encode(tokenizer, SHORT["messages"], 10_000)
    cutoff = len(full.input_ids) - 2
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT])
    data = build_data(SftStage(), config(train, train, cutoff_len=cutoff), tokenizer)
    assert data.stats["train"].truncated == 1 and data.splits["train"][0]["input_ids"] == full.input_ids[:cutoff]


def test_the_training_data_signature_tells_other_ids_and_masks_of_the_same_lengths(tmp_path, tokenizer):
    """A resume part-way through an epoch compares it: a tokenizer or chat template changed to one
    of the same lengths, or another loss mask, trains other samples than the checkpoint's run did;
    a checkpoint recorded before ``ids_labels_sha256`` existed (none, or the first formula's
    ``content_sha256``) is compared on the keys it has."""
    from sala_train.checkpoints import MANIFEST, refuse_other_training_data, training_data_signature
    from sala_train.errors import ConfigError

    train = write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG])
    masked, unmasked = (build_data(SftStage(), config(train, cutoff_len=4096, train_on_prompt=on), tokenizer)
                        for on in (False, True))  # fmt: skip
    a, b = masked.stats["train"], unmasked.stats["train"]
    assert a.lengths == b.lengths and len(a.content_sha256) == 16 and a.content_sha256 != b.content_sha256
    again = build_data(SftStage(), config(train, cutoff_len=4096), tokenizer).stats["train"]
    assert again.content_sha256 == a.content_sha256  # (the same data, tokenized again or from the cache)

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 0.5}))
    then = training_data_signature(a.lengths, a.content_sha256)
    before = {k: v for k, v in then.items() if k != "ids_labels_sha256"}
    for saved, refused in ((then, False), (before, False), ({**before, "content_sha256": "0123456789abcdef"}, False),
                           (training_data_signature(b.lengths, b.content_sha256), True)):  # fmt: skip
        (checkpoint / MANIFEST).write_text(json.dumps({"step": 1, "files": {}, "train_data": saved}))
        if not refused:
            refuse_other_training_data(checkpoint, then)
            continue
        with pytest.raises(ConfigError, match="the same counts: their order or token ids changed"):
            refuse_other_training_data(checkpoint, then)


def test_all_dropped_is_a_data_error(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [LONG])
    with pytest.raises(DataError, match=r"every sample was dropped \(1 no trained token left within "
                       r"dataset.cutoff_len\); raise dataset.cutoff_len \(now 40\)$"):  # fmt: skip
        build_data(SftStage(), config(train, train, cutoff_len=40), tokenizer)


def test_a_test_set_with_every_sample_dropped_is_a_data_error(tmp_path, tokenizer):
    """It is evaluated at the end of training: an empty one is refused at start, not after hours."""
    short, long = write_jsonl(tmp_path / "short.jsonl", [SHORT]), write_jsonl(tmp_path / "long.jsonl", [LONG])
    cutoff = len(encode(tokenizer, SHORT["messages"], 10_000).input_ids)
    with pytest.raises(DataError, match=r"^dataset.test: every sample was dropped "):
        build_data(SftStage(), DatasetConfig(name="t", train=[short], validation=[short], test=[long],
                                             cutoff_len=cutoff), tokenizer)  # fmt: skip
    kept = build_data(SftStage(), DatasetConfig(name="t", train=[short], validation=[short], test=[short],
                                                 cutoff_len=cutoff), tokenizer)  # fmt: skip
    assert kept.splits["test"]["input_ids"] == kept.splits["train"]["input_ids"]


def test_a_mixed_entrys_test_files_join_the_test_set(tmp_path, tokenizer):
    """An entry mixed in keeps its test files as it keeps its validation files (they were dropped)."""
    short, long = write_jsonl(tmp_path / "short.jsonl", [SHORT]), write_jsonl(tmp_path / "long.jsonl", [LONG])
    mixed = DatasetSource(name="other", train=[short], validation=[short], test=[long, long])
    data = build_data(SftStage(), DatasetConfig(name="t", train=[short], validation=[short], test=[short],
                                                cutoff_len=4096, mixed=[mixed]), tokenizer)  # fmt: skip
    lengths = [len(ids) for ids in data.splits["test"]["input_ids"]]
    assert lengths == [len(encode(tokenizer, m["messages"], 4096).input_ids) for m in (SHORT, LONG, LONG)]


def test_val_size_splits_train(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT] * 10)
    data = build_data(SftStage(), config(train, val_size=0.2, cutoff_len=512), tokenizer)
    assert len(data.splits["train"]) == 8 and len(data.splits["validation"]) == 2


def test_malformed_json_line_is_located(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(SHORT) + "\n" + '{"messages": [oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        build_data(SftStage(), config(str(path), str(path)), tokenizer)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        # A number past Python's 4,300-digit conversion limit, and nesting past its recursion limit:
        # a ValueError and a RecursionError, not JSONDecodeError, came out as a traceback.
        (
            "big.jsonl",
            json.dumps(SHORT) + '\n{"id": 1' + "0" * 4400 + "}\n",
            r"big.jsonl:2: malformed JSON line: a value Python cannot read \(Exceeds the limit \(4300 digits\)",
        ),
        (
            "big.json",
            "[" + json.dumps(SHORT) + ', {"id": 1' + "0" * 4400 + "}]",
            r"big.json: malformed JSON: a value Python cannot read",
        ),
        (
            "deep.jsonl",
            json.dumps(SHORT) + '\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            r"deep.jsonl:2: malformed JSON line: nested too deeply to read",
        ),
        # One object over several lines with a problem on its 6th: it was reported on line 1.
        (
            "pretty.jsonl",
            '{\n  "messages": [\n    {"role": "user", "content": "hi"},\n'
            '    {"role": "assistant", "content": "hello"}\n  ],\n  "x": [1, 2,]\n}\n',
            r"pretty.jsonl:6: malformed JSON: Expecting value \(column 14\)",
        ),
        # JSON lines whose first record is cut short: line 1, not the (valid) line 2 after it.
        (
            "cut.jsonl",
            json.dumps(SHORT)[:-1] + "\n" + json.dumps(SHORT) + "\n",
            r"cut.jsonl:1: malformed JSON line: Expecting ',' delimiter",
        ),
    ],
    ids=["big-number-line", "big-number-array", "deep-nesting", "pretty-printed", "first-line-cut"],
)
def test_json_python_cannot_read_is_located(tmp_path, tokenizer, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    good = write_jsonl(tmp_path / "good.jsonl", [SHORT])
    with pytest.raises(DataError, match=rf"(?m)^(  )?{tmp_path}/{message}"):  # (a bad line: listed as bad records are)
        build_data(SftStage(), config(str(path), good), tokenizer)


def test_bad_records_are_listed(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "no reply"}]}
    odd = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT, bad, odd])
    with pytest.raises(DataError) as err:
        build_data(SftStage(), config(train, train), tokenizer)
    text = str(err.value)
    assert "2 bad record(s) (1 roles out of order, 1 unknown role)" in text
    assert "train.jsonl:2: roles out of order: 'messages' must end with an assistant turn" in text
    assert "train.jsonl:3: unknown role: messages[0] has role='robot'" in text


def test_collator_pads_to_longest_in_batch_only():
    collate = PadToLongestCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def data_tool_output(tmp_path: Path, *overrides: str) -> str:
    """What ``sala-data`` prints, through the same compose -> check -> show path."""
    import io

    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import DataToolConfig
    from sala_train.data.report import show

    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = compose("data", overrides=list(overrides))
    out = io.StringIO()
    show(resolve_config(cfg, DataToolConfig, tmp_path), out)
    return out.getvalue()


def first_epoch_order(n: int, seed: int, scratch: Path) -> list[int]:
    """The sample order of a real Trainer's first training epoch (its dataloader, as accelerate prepares it)."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    ids = Dataset.from_dict({"input_ids": [[i] for i in range(n)], "labels": [[i] for i in range(n)]})
    args = TrainingArguments(
        output_dir=str(scratch), per_device_train_batch_size=1, seed=seed, report_to=[], use_cpu=True
    )
    loader = Trainer(model=model, args=args, train_dataset=ids).get_train_dataloader()
    return [int(batch["input_ids"][0, 0]) for batch in loader]


def test_sala_data_padding_is_that_of_the_batches_the_run_builds(tmp_path, tokenizer):
    """File order padded to the longest, packed rows, and length-grouped batches, through the run's collator."""
    replies = ["a " * n for n in (40, 2, 30, 3, 35, 1)]
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": r}]} for r in replies]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["dataset=messages", "dataset.train=[d.jsonl]", "dataset.validation=[d.jsonl]",
            "train.per_device_train_batch_size=2", "train.per_device_eval_batch_size=3"]  # fmt: skip
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]

    def padded(size: int, order: list[int]) -> str:
        rows = [[lengths[j] for j in order[i : i + size]] for i in range(0, len(order), size)]
        return f"{1 - sum(lengths) / sum(max(row) * len(row) for row in rows):.1%}"

    # Training batches in the order the Trainer itself draws them in its first epoch (it shuffles;
    # sala-data measured file order), evaluation's in file order.
    trainer_order = first_epoch_order(len(rows), 42, tmp_path / "trainer")
    assert trainer_order != list(range(len(rows)))
    assert padded(2, trainer_order) != padded(2, list(range(len(rows))))  # (the order changes the figure)
    plain = data_tool_output(tmp_path, *data, "train.seed=42")
    assert f"padding {padded(2, trainer_order)} in batches of 2\n" in plain
    assert f"padding {padded(3, list(range(len(rows))))} in batches of 3\n" in plain
    packed = data_tool_output(tmp_path, *data, "train.packing=true")  # rows of cutoff_len: one per batch
    assert "padding 0.0% in packed batches of 2\n" in packed and "padding 0.0% in packed batches of 3\n" in packed
    grouped = data_tool_output(tmp_path, *data, "train.group_by_length=true")
    share = float(grouped.split("padding ")[1].split("%")[0])
    assert " in length-grouped batches of 2\n" in grouped and share < float(padded(2, list(range(len(rows))))[:-1])


def test_default_system_opens_each_conversation_without_one_of_its_own(tmp_path, tokenizer):
    """``dataset.default_system`` (LLaMA-Factory's): the same tokens and loss mask as the record with
    that system turn written in; a record's own system prompt wins; DPO prompts get it too; the
    cache of the same files with another default (or none) is not reused."""
    from sala_train.config.schema import DatasetFormat, DpoStage

    system = "You answer in one short sentence."
    train = write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG])
    written_in = write_jsonl(tmp_path / "written_in.jsonl", [{"messages": [{"role": "system", "content": system},
                                                                           *SHORT["messages"]]}])  # fmt: skip
    data = build_data(SftStage(), config(train, train, cutoff_len=4096, default_system=system), tokenizer)
    (want,) = build_data(SftStage(), config(written_in, written_in, cutoff_len=4096), tokenizer).splits["train"]
    first, second = data.splits["train"]
    assert (first["input_ids"], first["labels"]) == (want["input_ids"], want["labels"])
    assert second["input_ids"] == encode(tokenizer, LONG["messages"], 4096).input_ids  # (its own system prompt)
    plain = build_data(SftStage(), config(train, train, cutoff_len=4096), tokenizer).splits["train"][0]
    other = build_data(SftStage(), config(train, train, cutoff_len=4096, default_system="Be kind."), tokenizer)
    assert plain["input_ids"] == encode(tokenizer, SHORT["messages"], 4096).input_ids
    assert (
        len({tuple(plain["input_ids"]), tuple(first["input_ids"]), tuple(other.splits["train"][0]["input_ids"])}) == 3
    )

    pair = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair])
    with_system = write_jsonl(tmp_path / "pairs_system.jsonl", [{**pair, "system": system}])
    dpo = {"format": DatasetFormat.PREFERENCE, "cutoff_len": 4096}
    (got,) = build_data(DpoStage(), config(pairs, pairs, default_system=system, **dpo), tokenizer).splits["train"]
    (own,) = build_data(DpoStage(), config(with_system, with_system, **dpo), tokenizer).splits["train"]
    assert got == own and system.split()[0] in tokenizer.decode(got["prompt_ids"])


def test_sala_data_counts_padding_rounded_up_as_the_run_rounds_it(tmp_path, tokenizer):
    """``train.pad_to_multiple_of``: the padding figure is that of the rounded batches, and says so."""
    replies = ["a " * n for n in (40, 2, 30, 3, 35, 1)]
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": r}]} for r in replies]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]
    batches = [lengths[0:3], lengths[3:6]]  # (evaluation: file order, batches of 3)
    widths = [-(-max(batch) // 16) * 16 for batch in batches]
    share = f"{1 - sum(lengths) / sum(w * len(b) for w, b in zip(widths, batches, strict=True)):.1%}"
    out = data_tool_output(tmp_path, "dataset=messages", "dataset.train=[d.jsonl]", "dataset.validation=[d.jsonl]",
                           "train.per_device_eval_batch_size=3", "train.pad_to_multiple_of=16")  # fmt: skip
    assert f"padding {share} in batches of 3 (widths rounded up to a multiple of 16)\n" in out, out


def test_sala_data_counts_preference_pairs_rounded_as_trl_pads_them(tmp_path, tokenizer):
    """DPO's figure is estimated from its rows padded to their longest: rounded too where the run's
    TRL collator gets the multiple."""
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import DataToolConfig
    from sala_train.data.build import build_data

    overrides = ["stage=dpo", "dataset=demo_preference", "method=full", "train.per_device_eval_batch_size=3",
                 "train.pad_to_multiple_of=64"]  # fmt: skip
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        cfg = resolve_config(compose("data", overrides=overrides), DataToolConfig, tmp_path)
    lengths = build_data(cfg.stage, cfg.dataset, tokenizer).stats["validation"].lengths
    chunks = [lengths[i : i + 3] for i in range(0, len(lengths), 3)]
    rounded = sum(-(-max(c) // 64) * 64 * len(c) for c in chunks)
    assert rounded > sum(max(c) * len(c) for c in chunks)
    out = data_tool_output(tmp_path, *overrides)
    share = f"{1 - sum(lengths) / rounded:.1%}"
    assert f"padding {share} in batches of 3 (widths rounded up to a multiple of 64)\n" in out, out
