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
    check_unchanged(
        model_config(base), run / BASE_WEIGHTS_FILE, "never said", seed=0
    )  # a run that recorded nothing: nothing to compare
    record(model_config(base), run, seed=0)
    assert json.loads((run / BASE_WEIGHTS_FILE).read_text())["files"] == fingerprint(base)
    check_unchanged(model_config(base), run / BASE_WEIGHTS_FILE, "never said", seed=0)
    saved_model(base, seed=1)
    (base / "extra.bin").write_bytes(b"weights")
    with pytest.raises(ConfigError) as caught:
        check_unchanged(model_config(base), run / BASE_WEIGHTS_FILE, "resuming would go on from other weights", seed=0)
    assert caught.value.problems == [
        f"model.name_or_path={base}: its weights are not the ones this run started from, recorded in "
        f"{run / BASE_WEIGHTS_FILE} from {base.resolve()} (model.safetensors differs, extra.bin is new); resuming "
        "would go on from other weights"
    ]
    record(
        model_config(TINY_CHAT), run, seed=0
    )  # no weights there (its load fails): nothing recorded, a stale record removed
    assert not (run / BASE_WEIGHTS_FILE).exists()


def test_a_config_or_code_changed_since_the_run_started_is_refused_from_scratch_too(tmp_path):
    """The same weights under an edited config.json are another model (its rope_theta, its
    rms_norm_eps), and a model built from scratch is its config.json and seed alone: a resume and an
    export went on with them without a word (eval loss 6.90 to 14.22 at the resume)."""
    base, run = saved_model(tmp_path / "base"), tmp_path / "run"
    run.mkdir()
    (base / "modeling_extra.py").write_text("# remote code\n")
    for from_scratch in (False, True):
        record(model_config(base, from_scratch), run, seed=0)
        recorded = json.loads((run / BASE_WEIGHTS_FILE).read_text())
        assert list(recorded["config_files"]) == ["config.json", "modeling_extra.py"]
        assert bool(recorded["files"]) is not from_scratch
        check_unchanged(model_config(base, from_scratch), run / BASE_WEIGHTS_FILE, "never said", seed=0)
        config = (base / "config.json").read_text()
        (base / "config.json").write_text(config.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 0.001'))
        (base / "modeling_extra.py").write_text("# remote code, edited\n")
        with pytest.raises(ConfigError) as caught:
            check_unchanged(
                model_config(base, from_scratch),
                run / BASE_WEIGHTS_FILE,
                "resuming would go on from another model",
                seed=0,
            )
        assert caught.value.problems == [
            f"model.name_or_path={base}: its config.json and code are not the ones this run started from, recorded in "
            f"{run / BASE_WEIGHTS_FILE} from {base.resolve()} (config.json differs, modeling_extra.py differs); "
            "resuming would go on from another model"
        ]
        (base / "config.json").write_text(config)
        (base / "modeling_extra.py").write_text("# remote code\n")
        check_unchanged(model_config(base, from_scratch), run / BASE_WEIGHTS_FILE, "never said", seed=0)
    # A code file that arrives later (transformers fetches a hub model's code as it needs it): no change.
    (base / "modeling_later.py").write_text("# fetched at load\n")
    check_unchanged(model_config(base, True), run / BASE_WEIGHTS_FILE, "never said", seed=0)
    # A record written before config files were: its weights alone compared.
    recorded = json.loads((run / BASE_WEIGHTS_FILE).read_text())
    (run / BASE_WEIGHTS_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "config_files"}))
    (base / "config.json").write_text("{}")
    check_unchanged(model_config(base, True), run / BASE_WEIGHTS_FILE, "never said", seed=0)


def test_a_tensor_changed_in_place_between_the_samples_is_another_model(tmp_path):
    """Three norm weights scaled in place, the file's size unchanged: none of the 64 spread samples
    touched them, so an adapter was merged into (and a run resumed from) the edited base without a
    word, its logits 0.75 off. Every tensor's first and last bytes are fingerprinted now."""
    from safetensors.torch import load_file, save_file

    from sala_train.base_weights import SAMPLE_BYTES, SAMPLES

    base, run = saved_model(tmp_path / "base"), tmp_path / "run"
    run.mkdir()
    record(model_config(base), run, seed=0)
    weights_file = base / "model.safetensors"
    size = weights_file.stat().st_size
    header = 8 + int.from_bytes(weights_file.read_bytes()[:8], "little")
    tensors = json.loads(weights_file.read_bytes()[8:header])
    sampled = [(i * (size - SAMPLE_BYTES) // (SAMPLES - 1), i * (size - SAMPLE_BYTES) // (SAMPLES - 1) + SAMPLE_BYTES)
               for i in range(SAMPLES)]  # fmt: skip

    def unsampled(name: str) -> bool:
        begin, end = (header + offset for offset in tensors[name]["data_offsets"])
        return all(end <= lo or begin >= hi for lo, hi in sampled)

    norms = [name for name in tensors if name.endswith("norm.weight") and unsampled(name)]
    assert norms, "no norm weight falls between the samples: the test no longer tests that"
    weights = load_file(weights_file)
    for name in norms:
        weights[name] = weights[name] * 3
    save_file(weights, weights_file, metadata={"format": "pt"})
    assert (
        weights_file.stat().st_size == size
        and fingerprint(base)["model.safetensors"]["sampled_sha256"]
        == (json.loads((run / BASE_WEIGHTS_FILE).read_text())["files"]["model.safetensors"]["sampled_sha256"])
    )
    with pytest.raises(ConfigError) as caught:
        check_unchanged(model_config(base), run / BASE_WEIGHTS_FILE, "merged into another base", seed=0)
    assert "(model.safetensors differs); merged into another base" in caught.value.problems[0]

    # A record written before tensor ends were recorded compares what it holds: size and samples.
    recorded = json.loads((run / BASE_WEIGHTS_FILE).read_text())
    del recorded["files"]["model.safetensors"]["tensor_ends_sha256"]
    (run / BASE_WEIGHTS_FILE).write_text(json.dumps(recorded))
    check_unchanged(model_config(base), run / BASE_WEIGHTS_FILE, "never said", seed=0)


def test_a_base_built_from_scratch_with_another_seed_is_another_model(tmp_path):
    """A from-scratch base is its config.json and train.seed: an export (or a resume) under another
    seed merged the adapter into other random weights."""
    run = tmp_path / "run"
    run.mkdir()
    record(model_config(TINY_CHAT, from_scratch=True), run, seed=42)
    assert json.loads((run / BASE_WEIGHTS_FILE).read_text())["seed"] == 42
    check_unchanged(model_config(TINY_CHAT, from_scratch=True), run / BASE_WEIGHTS_FILE, "never said", seed=42)
    with pytest.raises(ConfigError) as caught:
        check_unchanged(
            model_config(TINY_CHAT, from_scratch=True), run / BASE_WEIGHTS_FILE, "merged into another base", seed=7
        )
    assert caught.value.problems == [
        f"train.seed=7: model.name_or_path={TINY_CHAT} is built from scratch, and this run's base was drawn with "
        f"train.seed=42, recorded in {run / BASE_WEIGHTS_FILE}: another seed draws another base model; set "
        "train.seed=42"
    ]
    # Where the base's values are not used again (a full fine-tune's resume: the checkpoint holds
    # every weight), no seed is compared.
    check_unchanged(model_config(TINY_CHAT, from_scratch=True), run / BASE_WEIGHTS_FILE, "never said", seed=None)
