"""Writes tests/fixtures/llamafactory_guide_data.json: how LLaMA-Factory tokenizes the guide's own
data sets with the guide's ``template: cpm4``, the oracle ``tests/unit/test_llamafactory_parity.py``
holds sala-train's readers, templates and masks to.

For every record of sft_zh_demo, alpaca_en_demo and identity (SFT), dpo_en_demo (DPO) and
kto_en_demo (KTO), registered as the guide's ``dataset_info.json`` registers them, it stores short
hashes of what LLaMA-Factory's converters and processors produce with the tiny tokenizer (BOS
added, as cpm4 needs one), with no cut (``cutoff_len`` large; the two tools cut long samples
differently):

- SFT: the token ids, and the trained positions less the newline LLaMA-Factory trains after each
  ``<|im_end|>`` (sala-train's rule stops at the end-of-turn token);
- DPO / KTO: the prompt's ids, and each reply's ids less that trailing newline.

Needs LLaMA-Factory importable (not a dependency of sala-train), as for
``scripts/llamafactory_tool_renderings.py``; run with ``DISABLE_VERSION_CHECK=1`` where the installed
transformers is newer than it lists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llamafactory.data.converter import get_dataset_converter
from llamafactory.data.parser import get_dataset_list
from llamafactory.data.processor import (
    FeedbackDatasetProcessor,
    PairwiseDatasetProcessor,
    SupervisedDatasetProcessor,
)
from llamafactory.data.template import TEMPLATES
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.hparams.data_args import DataArguments
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY_CHAT = REPO / "sala_train" / "assets" / "models" / "tiny-chat"
OUT = REPO / "tests" / "fixtures" / "llamafactory_guide_data.json"

# The guide's dataset_info.json entries (its LLaMA-Factory section), files from ../shared/data.
REGISTRY: dict[str, tuple[Path, dict[str, Any]]] = {
    "sft_zh_demo": (SHARED / "minicpm-sala-finetune/llama_factory/sft_zh_demo.json", {}),
    "alpaca_en_demo": (SHARED / "llamafactory/alpaca_en_demo.json", {}),
    "identity": (SHARED / "llamafactory/identity.json", {}),
    "kto_en_demo": (
        SHARED / "minicpm-sala-finetune/llama_factory/kto_en_demo.json",
        {
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "kto_tag": "label"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
    ),
    "dpo_en_demo": (
        SHARED / "minicpm-sala-finetune/llama_factory/dpo_en_demo.json",
        {
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    ),
}
STAGES = {"sft_zh_demo": "sft", "alpaca_en_demo": "sft", "identity": "sft", "dpo_en_demo": "dpo", "kto_en_demo": "kto"}


def short_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    tokenizer.add_special_tokens({"bos_token": "<|endoftext|>"})  # cpm4 starts with BOS; tiny-chat has none
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]
    assert len(newline) == 1
    newline_id = newline[0]

    def without_trailing_newline(reply: list[int]) -> list[int]:
        assert reply[-2:] == [im_end, newline_id], reply[-2:]
        return reply[:-1]

    template = copy.deepcopy(TEMPLATES["cpm4"])
    data_args = DataArguments(template="cpm4", cutoff_len=1_000_000)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        info = {}
        for name, (path, entry) in REGISTRY.items():
            (Path(tmp) / path.name).symlink_to(path)
            info[name] = {"file_name": path.name, **entry}
        (Path(tmp) / "dataset_info.json").write_text(json.dumps(info))
        for name, stage in STAGES.items():
            attr = get_dataset_list([name], tmp)[0]
            convert = get_dataset_converter(attr.formatting, attr, data_args)
            records = json.loads(REGISTRY[name][0].read_text(encoding="utf-8"))
            rows = []
            for record in records:
                ex = convert(record)
                media: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
                if stage == "sft":
                    proc = SupervisedDatasetProcessor(template, tokenizer, None, data_args)
                    ids, labels = proc._encode_data_example(ex["_prompt"], ex["_response"], ex["_system"],
                                                            ex["_tools"], *media)  # fmt: skip
                    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
                    # LLaMA-Factory trains the newline after each trained <|im_end|>; sala-train does not.
                    ours = [i for i in trained if not (ids[i] == newline_id and i > 0 and ids[i - 1] == im_end)]
                    rows.append([short_hash(ids), short_hash(ours)])
                elif stage == "dpo":
                    proc = PairwiseDatasetProcessor(template, tokenizer, None, data_args)
                    chosen, chosen_labels, rejected, _ = proc._encode_data_example(
                        ex["_prompt"], ex["_response"], ex["_system"], ex["_tools"], *media
                    )
                    start = next(i for i, label in enumerate(chosen_labels) if label != IGNORE_INDEX)
                    prompt = chosen[:start]
                    assert rejected[:start] == prompt
                    rows.append([short_hash(prompt), short_hash(without_trailing_newline(chosen[start:])),
                                 short_hash(without_trailing_newline(rejected[start:]))])  # fmt: skip
                else:
                    proc = FeedbackDatasetProcessor(template, tokenizer, None, data_args)
                    ids, labels, _, _, tag = proc._encode_data_example(
                        ex["_prompt"], ex["_response"], ex["_response"], ex["_system"], ex["_tools"], *media
                    )
                    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
                    rows.append([short_hash(ids[:start]), short_hash(without_trailing_newline(ids[start:])), tag])
            out[name] = rows
    payload = {
        "generated_by": f"scripts/llamafactory_guide_data.py with llamafactory {version('llamafactory')}",
        "tokenizer": "sala_train/assets/models/tiny-chat, bos_token <|endoftext|>",
        "template": "cpm4",
        "rows": "sft: [ids, trained positions]; dpo: [prompt, chosen, rejected]; kto: [prompt, completion, label]",
        "data_sets": out,
    }
    OUT.write_text(json.dumps(payload, indent=0) + "\n", encoding="utf-8")
    print({name: len(rows) for name, rows in out.items()}, "->", OUT)


if __name__ == "__main__":
    main()
