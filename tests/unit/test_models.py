"""How sala-train asks transformers for a pretrained model."""

from __future__ import annotations

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
