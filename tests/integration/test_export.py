"""sala-export: a LoRA run merged into a plain model whose logits equal the adapter model's."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tests.conftest import SHARES_FULL_RUN, run_cli
from tests.integration.test_cli import assert_ok, snapshot

pytestmark = pytest.mark.slow

SHORT = ("train.max_steps=8", "train.eval_steps=8", "train.save_steps=8", "train.learning_rate=1e-2")


def test_lora_run_exports_a_plain_model_with_the_same_logits(tmp_path):
    assert_ok(run_cli("sala-train", "method=lora", "hydra.run.dir=run", *SHORT, cwd=tmp_path))
    proc = run_cli("sala-export", "run", cwd=tmp_path)
    assert_ok(proc)
    (diff,) = re.findall(r"max \|merged - adapter\| = (\S+)", proc.stdout)
    assert float(diff) < 1e-4

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run, export = tmp_path / "run", tmp_path / "run" / "export"
    cfg = yaml.safe_load((run / "config.yaml").read_text())

    # The adapter model built independently: the run's seeded random base (a from_scratch model) + final/.
    def seeded_base():
        torch.manual_seed(cfg["train"]["seed"])
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg["model"]["name_or_path"])).eval()

    adapter_model = PeftModel.from_pretrained(seeded_base(), str(run / "final")).eval()
    merged = AutoModelForCausalLM.from_pretrained(export).eval()  # a plain HF model: no peft, no sala-train
    tokenizer = AutoTokenizer.from_pretrained(export)
    chat = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)])
    with torch.no_grad():
        want, got = adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits
        untrained = seeded_base()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (untrained - got).abs().max() > 0.1  # the adapter changed the model, and the export kept it

    again = run_cli("sala-export", "run", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@SHARES_FULL_RUN
def test_full_run_is_not_exported(full_run, tmp_path):
    before = snapshot(full_run)
    proc = run_cli("sala-export", "run", cwd=full_run.parent)
    assert proc.returncode == 2 and "method=full" in proc.stderr and "already a plain model" in proc.stderr
    assert snapshot(full_run) == before  # no export/ begun
    missing = run_cli("sala-export", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "not a sala-train run directory" in missing.stderr
