"""The fingerprint of a run's base weights: the same model anywhere, another model told apart."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sala_train.base_weights import BASE_WEIGHTS_FILE, check_unchanged, fingerprint, record
from sala_train.config.schema import ModelConfig
from sala_train.config.typed import ConfigError
from tests.conftest import TINY_CHAT


def saved_model(where, seed=0, merged_lora=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    if merged_lora:  # what a merged adapter on q_proj alone changes: one small matrix a layer
        from peft import LoraConfig, get_peft_model

        adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model = adapted.merge_and_unload()
    model.save_pretrained(where)
    return where


def model_config(path, from_scratch=False):
    return ModelConfig(name_or_path=str(path), from_scratch=from_scratch)


def test_the_same_weights_anywhere_and_other_weights_told_apart(tmp_path):
    base = saved_model(tmp_path / "base")
    copy = shutil.copytree(base, tmp_path / "elsewhere" / "copy")
    assert fingerprint(base) == fingerprint(copy) and list(fingerprint(base)) == ["model.safetensors"]
    assert fingerprint(saved_model(tmp_path / "other", seed=1)) != fingerprint(base)
    # A LoRA merged into q_proj only (2 x 64 KiB of a 1.6 MiB file) is another model too.
    assert fingerprint(saved_model(tmp_path / "merged", merged_lora=True)) != fingerprint(base)


def test_weights_changed_since_the_run_started_are_refused_by_file(tmp_path):
    base, run = saved_model(tmp_path / "base"), tmp_path / "run"
    run.mkdir()
    check_unchanged(model_config(base), run, "never said")  # a run that recorded nothing: nothing to compare
    record(model_config(base), run)
    assert json.loads((run / BASE_WEIGHTS_FILE).read_text())["files"] == fingerprint(base)
    check_unchanged(model_config(base), run, "never said")
    saved_model(base, seed=1)
    (base / "extra.bin").write_bytes(b"weights")
    with pytest.raises(ConfigError) as caught:
        check_unchanged(model_config(base), run, "resuming would go on from other weights")
    assert caught.value.problems == [
        f"model.name_or_path={base}: its weights are not the ones this run started from, recorded in "
        f"{run / BASE_WEIGHTS_FILE} from {base.resolve()} (model.safetensors differs, extra.bin is new); resuming "
        "would go on from other weights"
    ]
    # A model built from scratch has no files: nothing recorded, a stale record removed.
    record(model_config(TINY_CHAT, from_scratch=True), run)
    assert not (run / BASE_WEIGHTS_FILE).exists()
    record(model_config(TINY_CHAT), run)  # no weights there (its load fails): nothing recorded
    assert not (run / BASE_WEIGHTS_FILE).exists()
