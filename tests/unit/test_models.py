"""How sala-train asks transformers for a pretrained model."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from sala_train.config.schema import ModelConfig
from sala_train.models import load_model
from tests.conftest import TINY_CHAT


def test_pretrained_weights_load_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 turned Hub kernels on by default: layers swapped at load time for code fetched
    from the Hub (offline: a load error). The run's kernels are model.liger's only, on any version."""
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).save_pretrained(tmp_path)
    asked: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = load_model(ModelConfig(name_or_path=str(tmp_path)), seed=0)
    assert [kwargs.get("use_kernels") for kwargs in asked] == [False]
    assert not model.use_kernels


def test_export_saves_each_weight_in_the_dtype_it_was_loaded_in():
    """transformers keeps some modules of a 16-bit model in float32 (MoE routers and correction
    biases: _keep_in_fp32_modules_strict); the export, merged in float32, cast every weight to the
    model's dtype, rounding those that LoRA never touched."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.export import _as_loaded

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).to(torch.bfloat16)
    norm = model.model.norm
    norm.weight.data = 1 + 1e-3 * torch.randn(norm.weight.shape)  # (values bf16 cannot hold)
    want = norm.weight.detach().clone()
    loaded = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    _as_loaded(model.float(), loaded, torch.bfloat16)
    assert norm.weight.dtype == torch.float32 and torch.equal(norm.weight, want)
    assert {p.dtype for name, p in model.named_parameters() if name != "model.norm.weight"} == {torch.bfloat16}


def test_weight_files_are_readable_as_the_umask_makes_any_file(tmp_path, monkeypatch):
    """safetensors writes 0600; a DPO/KTO checkpoint's reference adapter sits in a folder below.
    The umask is read from /proc, not set to read it (for that moment, every thread's)."""
    import os

    import torch
    from safetensors.torch import save_file

    from sala_train.atomic import readable_weights

    (tmp_path / "ref").mkdir()
    for path in (tmp_path / "model.safetensors", tmp_path / "ref" / "adapter_model.safetensors"):
        save_file({"w": torch.zeros(1)}, str(path))
        assert path.stat().st_mode & 0o777 == 0o600
    before = os.umask(0o27)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(os, "umask", lambda mask: pytest.fail("the umask was set"))
            readable_weights(tmp_path)
    finally:
        os.umask(before)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*.safetensors")} == {0o640}


def test_the_exports_check_loads_a_model_without_sdpa_with_eager(tmp_path):
    """A Gemma 2 run trained with flash_attention_2: the check's sdpa (float32, any machine) is
    one Gemma 2 does not have, and the advice (eager) was one sala-export does not take."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from sala_train.config.schema import AttnImplementation
    from sala_train.export import _load_for_check

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    flash = ModelConfig(name_or_path=str(tmp_path), attn_implementation=AttnImplementation.FLASH_ATTENTION_2)
    assert _load_for_check(flash, seed=0).config._attn_implementation == "eager"
    llama = tmp_path / "llama"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).save_pretrained(llama)
    flash = ModelConfig(name_or_path=str(llama), attn_implementation=AttnImplementation.FLASH_ATTENTION_2)
    assert _load_for_check(flash, seed=0).config._attn_implementation == "sdpa"


def test_a_base_given_a_chat_template_stops_generating_where_its_replies_end(tokenizer):
    """A base whose eos is <|endoftext|>, fine-tuned under dataset.template=chatml, learns to end
    replies with <|im_end|>: generate() stopped only at eos and wrote <|im_end|> to the token limit."""
    from transformers import AutoTokenizer

    from sala_train.data.chat import use_named_template
    from sala_train.models import stop_at_reply_end

    base_tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    base_tokenizer.eos_token, base_tokenizer.chat_template = "<|endoftext|>", None
    config = AutoConfig.from_pretrained(TINY_CHAT, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.generation_config.eos_token_id == 0
    assert stop_at_reply_end(model, base_tokenizer) is None  # no template: nothing is known of its replies
    use_named_template(base_tokenizer, "chatml")
    im_end = base_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != 0
    assert stop_at_reply_end(model, base_tokenizer) == "<|im_end|>"
    assert model.generation_config.eos_token_id == [0, im_end]  # (eos kept: the base's own stop)
    assert base_tokenizer.eos_token == "<|endoftext|>"  # (data and masks are built with it)
    assert stop_at_reply_end(model, base_tokenizer) is None  # there already: nothing changes
    assert model.generation_config.eos_token_id == [0, im_end]

    # A model whose eos is what its template ends replies with (the tiny chat model): unchanged.
    own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    before = own.generation_config.eos_token_id
    assert stop_at_reply_end(own, tokenizer) is None and own.generation_config.eos_token_id == before


def test_tokenizers_sala_train_loads_do_not_warn_of_long_texts(caplog):
    """sala-export reloads the run's own tokenizer: its tokenization of the validation samples said
    "Token indices sequence length is longer than the specified maximum (4713 > 4096)"; texts are
    cut at dataset.cutoff_len after tokenizing, so the warning only misleads."""
    import logging

    from transformers import AutoTokenizer

    from sala_train.models import without_the_length_warning

    long_text = "word " * 5000
    for quiet in (False, True):
        tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
        if quiet:
            without_the_length_warning(tokenizer)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            tokenizer(long_text)
        assert ("longer than the specified maximum" in caplog.text) is not quiet


def test_the_reply_end_is_found_for_a_template_that_wants_a_system_turn(tokenizer):
    """A template that refuses a conversation without a system turn trains replies ending with
    <|im_end|> all the same: its one-turn probe failed, and nothing was added nor said."""
    from transformers import AutoTokenizer

    from sala_train.data.chat import TemplateError, reply_end_token
    from sala_train.models import stop_at_reply_end

    wants_system = AutoTokenizer.from_pretrained(TINY_CHAT)
    wants_system.eos_token = "<|endoftext|>"
    wants_system.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    wants_system.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert reply_end_token(wants_system) == "<|im_end|>"
    # One that refuses every probe: said by the caller (the runner warns), not passed over.
    wants_system.chat_template = "{{ raise_exception('never') }}"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT, eos_token_id=0))
    with pytest.raises(TemplateError):
        stop_at_reply_end(model, wants_system)
    assert model.generation_config.eos_token_id == 0


def test_the_tokenizer_keeps_its_padding_side_and_special_tokens(tmp_path):
    """The tokenizer saved in final/ and by sala-export is the one users generate with: a base
    tokenizer's left padding came out right (batched generate() then padded prompts on the wrong
    side), and dataset.template=chatml replaced its list of extra special tokens with <|im_end|>."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from sala_train.data.chat import use_named_template
    from sala_train.models import load_tokenizer

    shutil.copytree(TINY_CHAT, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    # (eos <|endoftext|>: <|im_end|> is then no special token, which the chatml template adds)
    config.update(padding_side="left", eos_token="<|endoftext|>", extra_special_tokens=["<tool_call>"])
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert tokenizer.padding_side == "left"
    special = set(tokenizer.all_special_tokens)
    assert "<tool_call>" in special
    assert "<|im_end|>" not in special
    use_named_template(tokenizer, "chatml", "default")
    assert special | {"<|im_end|>"} <= set(tokenizer.all_special_tokens)
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert saved.padding_side == "left" and special <= set(saved.all_special_tokens)
