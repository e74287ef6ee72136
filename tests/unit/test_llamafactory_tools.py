"""chatml/cpm4 tool calls against LLaMA-Factory's own output.

The guide trains tool calls with LLaMA-Factory's ``template: cpm4``. The expected token ids here are
LLaMA-Factory 0.9.5's (``scripts/llamafactory_tool_renderings.py`` wrote them with the tiny
tokenizer), not a reading of its source: sala-train must produce the same ids and train exactly the
tokens LLaMA-Factory trains (by default, with ``mask_history`` and with ``train_on_prompt``), less
the newline after each reply's end-of-turn token (our loss-mask rule).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sala_train.config.schema import ChatTemplate, DatasetColumns, DatasetConfig, DatasetFormat, SftStage, ToolFormat
from sala_train.data.build import build_data
from sala_train.data.chat import IGNORE_INDEX, use_named_template

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "llamafactory_tool_renderings.json").read_text())
CASES = FIXTURE["cases"]


def cpm4_ready(tokenizer):
    """tiny-chat has no BOS; the fixture's cpm4 renderings gave it <|endoftext|> as one."""
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<|endoftext|>"})
    return with_bos


@pytest.mark.parametrize("option", ["default", "mask_history", "train_on_prompt"])
@pytest.mark.parametrize(
    "rendering", FIXTURE["renderings"], ids=lambda r: f"{r['template']}-{r['tool_format']}-{r['case']}"
)
def test_same_ids_and_trained_tokens_as_llamafactory(tmp_path, tokenizer, rendering, option):
    tok = cpm4_ready(tokenizer) if rendering["template"] == "cpm4" else copy.deepcopy(tokenizer)
    record = CASES[rendering["case"]]
    path = tmp_path / "case.json"
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    cfg = DatasetConfig(
        name="t", train=[str(path)], validation=[str(path)], format=DatasetFormat.SHAREGPT,
        columns=DatasetColumns(messages="conversations", tools="tools" if "tools" in record else None),
        template=ChatTemplate(rendering["template"]),
        # default is what null means, as LLaMA-Factory's cpm4 means it when no tool_format is given
        tool_format=None if rendering["tool_format"] == "default" else ToolFormat(rendering["tool_format"]),
        mask_history=option == "mask_history", train_on_prompt=option == "train_on_prompt",
    )  # fmt: skip
    row = build_data(SftStage(), cfg, tok).splits["train"][0]
    ids = row["input_ids"]
    assert tok.decode(ids) == rendering["text"]
    assert ids == rendering["input_ids"]
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    expected = rendering["trained_positions"][option]
    if option != "train_on_prompt":  # LLaMA-Factory also trains the newline after a reply's <|im_end|>
        im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n")["input_ids"][0]
        expected = [i for i in expected if not (ids[i] == newline and ids[i - 1] == im_end)]
    assert trained == expected
    if option == "default":
        replies = tok.decode([ids[i] for i in trained])
        assert replies == "".join(reply.removesuffix("\n") for reply in rendering["responses"])


@pytest.mark.parametrize("tool_format", ["default", "qwen"])
def test_inference_callers_may_pass_arguments_as_json_text(tokenizer, tool_format):
    """The saved template renders OpenAI-style calls (arguments as JSON text) as training wrote them."""
    tok = copy.deepcopy(tokenizer)
    use_named_template(tok, "chatml", tool_format)
    arguments = {"city": "Oslo", "unit": "celsius"}

    def rendered(args):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": args}}
        messages = [{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        return tok.apply_chat_template(messages, tokenize=False)

    assert rendered(json.dumps(arguments)) == rendered(arguments)
    assert json.dumps(arguments) in rendered(arguments)
