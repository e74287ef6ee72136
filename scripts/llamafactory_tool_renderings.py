"""Writes tests/fixtures/llamafactory_tool_renderings.json: LLaMA-Factory's own renderings of tool-call
conversations, the oracle ``tests/unit/test_llamafactory_tools.py`` holds sala-train's chatml/cpm4
templates to.

The guide trains tool calls with LLaMA-Factory's ``template: cpm4``; a model tuned that way must
see the same tokens when training continues under sala-train, so the fixture holds LLaMA-Factory's
token ids and text for each case, not our reading of its source. Needs LLaMA-Factory importable
(only its ``data`` modules are used; it is not a dependency of sala-train):

    pip download llamafactory==0.9.5 --no-deps -d /tmp/lf && python -m zipfile -e /tmp/lf/*.whl /tmp/lf/pkg
    DISABLE_VERSION_CHECK=1 PYTHONPATH=/tmp/lf/pkg python scripts/llamafactory_tool_renderings.py

(its ``mm_plugin`` imports torchaudio; an empty stand-in package on ``PYTHONPATH`` is enough, as
nothing multimodal runs here).
"""

from __future__ import annotations

import copy
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llamafactory.data.formatter import FunctionFormatter, ToolFormatter
from llamafactory.data.processor import SupervisedDatasetProcessor
from llamafactory.data.template import TEMPLATES
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.hparams.data_args import DataArguments
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_CHAT = REPO / "sala_train" / "assets" / "models" / "tiny-chat"
OUT = REPO / "tests" / "fixtures" / "llamafactory_tool_renderings.json"

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]},
            "fields": {"type": "array", "description": "What to report", "items": {"type": "string"}},
        },
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"description": "IANA zone"}}}}
TRANSLATE = {
    "name": "translate",
    "description": "翻译文本",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


# Each case: a record in LLaMA-Factory's glaive_toolcall layout (sharegpt turns, tools as JSON text).
CASES: dict[str, dict[str, Any]] = {
    "one_call": {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps(call("get_weather", {"city": "Paris"}))},
            {"from": "observation", "value": '{"temperature": 18}'},
            {"from": "gpt", "value": "It is 18 degrees."},
        ],
        "tools": json.dumps([WEATHER]),
    },
    "system_parallel_calls_and_a_second_turn": {
        "conversations": [
            {"from": "human", "value": "Weather and time in Oslo?"},
            {
                "from": "function_call",
                "value": json.dumps([call("get_weather", {"city": "Oslo", "unit": "celsius"}), call("get_time", {})]),
            },
            {"from": "observation", "value": "rain; 10:00"},
            {"from": "gpt", "value": "Rain, and it is ten."},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You are welcome."},
        ],
        "system": "Be brief.",
        "tools": json.dumps([WEATHER, TIME]),
    },
    "chinese_without_a_call": {
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么可以帮你？"},
            {"from": "human", "value": "把“早上好”翻译成英文"},
            {"from": "function_call", "value": json.dumps(call("translate", {"text": "早上好"}), ensure_ascii=False)},
            {"from": "observation", "value": "Good morning"},
            {"from": "gpt", "value": "Good morning."},
        ],
        "tools": json.dumps([TRANSLATE], ensure_ascii=False),
    },
    "no_tools": {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        "system": "Be kind.",
    },
}
ROLES = {"human": "user", "gpt": "assistant", "function_call": "function", "observation": "observation"}


def lf_template(name: str, tool_format: str) -> Any:
    """LLaMA-Factory's template ``name`` with its calls and tools in ``tool_format``, calls closed
    as the template closes replies (as LLaMA-Factory's own ``qwen`` template registers them)."""
    template = copy.deepcopy(TEMPLATES[name])
    template.format_function = FunctionFormatter(slots=template.format_assistant.slots, tool_format=tool_format)
    template.format_tools = ToolFormatter(tool_format=tool_format)
    return template


def render(template: Any, tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory's ids, text and replies for ``record``, and its trained positions as its SFT
    processor marks them by default, with ``mask_history`` and with ``train_on_prompt``."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    pairs = template.encode_multiturn(tokenizer, messages, record.get("system"), record.get("tools"))
    ids = [i for prompt, response in pairs for i in (*prompt, *response)]
    trained = {}
    for option in ("default", "mask_history", "train_on_prompt"):
        args = DataArguments(template="cpm4", cutoff_len=1_000_000, **({option: True} if option != "default" else {}))
        processor = SupervisedDatasetProcessor(template, tokenizer, None, args)
        # the processor takes the conversation as prompt (all but the last reply) and response
        processed, labels = processor._encode_data_example(
            messages[:-1], messages[-1:], record.get("system"), record.get("tools"), [], [], []
        )
        assert processed == ids
        trained[option] = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return {
        "input_ids": ids,
        "text": tokenizer.decode(ids),
        "responses": [tokenizer.decode(response) for _, response in pairs],
        "trained_positions": trained,
    }


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<|endoftext|>"})  # cpm4 starts with BOS; tiny-chat has none
    renderings = []
    for template, tool_format, tok in (("chatml", "default", tokenizer), ("cpm4", "default", with_bos),
                                       ("cpm4", "qwen", with_bos)):  # fmt: skip
        for case, record in CASES.items():
            out = render(lf_template(template, tool_format), tok, record)
            renderings.append({"case": case, "template": template, "tool_format": tool_format, **out})
    payload = {
        "generated_by": f"scripts/llamafactory_tool_renderings.py with llamafactory {version('llamafactory')}",
        "tokenizer": "sala_train/assets/models/tiny-chat (cpm4: bos_token <|endoftext|>)",
        "cases": CASES,
        "renderings": renderings,
    }
    text = json.dumps(payload, ensure_ascii=False, indent=1)
    text = re.sub(r"\[[\d,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)  # lists of ids on one line
    OUT.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(renderings)} renderings to {OUT}")


if __name__ == "__main__":
    main()
