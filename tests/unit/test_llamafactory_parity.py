"""Every record of the guide's LLaMA-Factory data sets, through sala-train's conf entries with the
guide's ``template: cpm4``, against LLaMA-Factory 0.9.5's own tokenization of the same files.

The expected values are hashes of what LLaMA-Factory's converters and processors produced
(``scripts/llamafactory_guide_data.py``, tiny tokenizer with a BOS): the same token ids, the same
trained positions (less the newline LLaMA-Factory trains after each ``<|im_end|>``), and for DPO
and KTO the same prompt and reply ids and KTO labels. A guide user switching to sala-train trains
on exactly the tokens the guide's run trained on.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from sala_train.data.build import build_data
from sala_train.data.chat import IGNORE_INDEX
from tests.conftest import SHARED

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "llamafactory_guide_data.json").read_text())
FILES = {
    "sft_zh_demo": SHARED / "data/minicpm-sala-finetune/llama_factory/sft_zh_demo.json",
    "alpaca_en_demo": SHARED / "data/llamafactory/alpaca_en_demo.json",
    "identity": SHARED / "data/llamafactory/identity.json",
    "dpo_en_demo": SHARED / "data/minicpm-sala-finetune/llama_factory/dpo_en_demo.json",
    "kto_en_demo": SHARED / "data/minicpm-sala-finetune/llama_factory/kto_en_demo.json",
}
STAGES = {"dpo_en_demo": "dpo", "kto_en_demo": "kto"}


def short_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def run_config(name: str, path: Path, tmp_path: Path):
    """``dataset=<name>`` as a user composes it, the guide's cpm4, every record, in file order, uncut."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig

    overrides = [f"stage={STAGES.get(name, 'sft')}", "method=full", f"dataset={name}", f"dataset.train=[{path}]",
                 f"dataset.validation=[{path}]", "dataset.val_size=null", "dataset.template=cpm4",
                 "dataset.cutoff_len=1000000", "dataset.max_samples=null"]  # fmt: skip
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=overrides)
    return resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)


@pytest.mark.parametrize("name", list(FILES))
def test_every_record_tokenizes_as_llamafactory_does(tmp_path, tokenizer, name):
    if not FILES[name].is_file():
        pytest.skip(f"{FILES[name]} is not here")
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"bos_token": "<|endoftext|>"})  # cpm4 starts with BOS; tiny-chat has none
    expected = FIXTURE["data_sets"][name]
    cfg = run_config(name, FILES[name], tmp_path)
    data = build_data(cfg.stage, cfg.dataset, tok)
    rows = data.splits["train"]
    assert len(rows) == len(expected), dict(data.stats["train"].dropped)
    for i, (row, want) in enumerate(zip(rows, expected, strict=True)):
        if name in STAGES:
            replies = ("chosen_ids", "rejected_ids") if name == "dpo_en_demo" else ("completion_ids",)
            got = [short_hash(row["prompt_ids"]), *(short_hash(row[r]) for r in replies)]
            if name == "kto_en_demo":
                got.append(row["label"])
        else:
            trained = [j for j, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            got = [short_hash(row["input_ids"]), short_hash(trained)]
        assert got == want, f"{name} record {i}"
