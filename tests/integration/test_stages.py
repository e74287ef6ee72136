"""Every stage end to end on the tiny model: pretrain, DPO, KTO (full and LoRA), and every data set
the guide ships training through its conf/dataset entry."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import SHARED, run_cli
from tests.integration.test_cli import assert_ok, metrics

pytestmark = pytest.mark.slow

# TRL computes log-probabilities from lm_head.weight, so preference stages adapt the blocks only.
BLOCKS = "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
METHODS = {"full": ("method=full", "train.learning_rate=1e-3"), "lora": ("method=lora", BLOCKS)}
LEARN = ("train.max_steps=60", "train.eval_steps=20", "train.save_steps=60", "train.logging_steps=10")


def evals(run: Path) -> list[dict]:
    return [r for r in metrics(run) if r["event"] == "eval"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_reward_accuracy_rises_on_a_learnable_preference(tmp_path, method):
    proc = run_cli("sala-train", "stage=dpo", "dataset=demo_preference", *METHODS[method], *LEARN,
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    run = tmp_path / "run"
    first, last = evals(run)[0], evals(run)[-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["eval_rewards/accuracies"] >= 0.8 > first["eval_rewards/accuracies"]
    assert last["eval_loss"] < first["eval_loss"] - 0.1 and last["eval_rewards/margins"] > 0.5
    train = [r for r in metrics(run) if r["event"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(train[-1])
    assert "num_tokens" not in train[-1]  # TRL's own count, which restarted at 0 on a resume
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (run / "final" / weights).is_file()
    assert not (run / "README.md").exists()  # TRL's hub model card, naming no model, is not written
    assert not (run / "final" / "ref").exists()  # TRL's reference adapter (LoRA): not the trained one


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kto_separates_desirable_from_undesirable(tmp_path, method):
    proc = run_cli("sala-train", "stage=kto", "dataset=demo_kto", *METHODS[method], *LEARN, "hydra.run.dir=run",
                   cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    first, last = evals(tmp_path / "run")[0], evals(tmp_path / "run")[-1]
    assert first["eval_rewards/margins"] == 0.0
    assert last["eval_rewards/chosen"] > 0 > last["eval_rewards/rejected"] and last["eval_rewards/margins"] > 1.0
    assert last["eval_loss"] < first["eval_loss"] - 0.1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pretrain_trains_on_text_blocks(tmp_path, method):
    proc = run_cli("sala-train", "stage=pretrain", "dataset=demo_text", f"method={method}", "hydra.run.dir=run",
                   "train.max_steps=20", "train.eval_steps=10", "train.save_steps=20", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    first, last = evals(tmp_path / "run")[0], evals(tmp_path / "run")[-1]
    assert last["eval_loss"] < first["eval_loss"] - 0.5  # every token is trained: the loss falls fast


GUIDE = SHARED / "data"
GUIDE_ENTRIES = {  # conf/dataset entry -> (stage, the files it expects under data/ where you run)
    "dpo_en_demo": ("dpo", {"dpo_en_demo.json": "minicpm-sala-finetune/llama_factory/dpo_en_demo.json"}),
    "kto_en_demo": ("kto", {"kto_en_demo.json": "minicpm-sala-finetune/llama_factory/kto_en_demo.json"}),
    "sft_zh_demo": ("sft", {"sft_zh_demo.json": "minicpm-sala-finetune/llama_factory/sft_zh_demo.json"}),
    "alpaca_en_demo": ("sft", {"alpaca_en_demo.json": "llamafactory/alpaca_en_demo.json"}),
    "identity": ("sft", {"identity.json": "llamafactory/identity.json"}),
    "c4_demo": ("pretrain", {"c4_demo.jsonl": "llamafactory/c4_demo.jsonl"}),
    "advertisegen_chatml": ("sft", {"AdvertiseGenChatML": "minicpm-sala-finetune/AdvertiseGenChatML"}),
    "ocnli_chatml": ("sft", {"ocnli_public_chatml": "minicpm-sala-finetune/ocnli_public_chatml"}),
}


# LLaMA-Factory's ``dataset: a,b`` across formats (alpaca + messages; text + alpaca): the entries
# named here train in test_guide_data_sets_mixed_as_llamafactory_lists_them, the rest alone.
MIXES = [
    ("sft", "alpaca_en_demo", ["identity", "advertisegen_chatml", "sft_zh_demo"]),
    ("pretrain", "c4_demo", ["alpaca_en_demo"]),
]
ALONE = sorted(set(GUIDE_ENTRIES) - {name for _, entry, mix in MIXES for name in (entry, *mix)})


def test_the_mixes_name_shipped_guide_entries():
    """(else an entry left out of ALONE would be trained by no test)"""
    shipped = {p.stem for p in (Path(__file__).parents[2] / "sala_train/conf/dataset").glob("*.yaml")}
    assert {n for _, e, mix in MIXES for n in (e, *mix)} <= set(GUIDE_ENTRIES) <= shipped


@pytest.mark.parametrize("entry", ALONE)
def test_every_guide_data_set_trains_through_its_entry(tmp_path, entry):
    stage, files = GUIDE_ENTRIES[entry]
    if not GUIDE.is_dir():
        pytest.skip(f"the guide's data is not at {GUIDE}")
    (tmp_path / "data").mkdir()
    for name, source in files.items():
        os.symlink(GUIDE / source, tmp_path / "data" / name)
    extra = (BLOCKS,) if stage in ("dpo", "kto") else ()
    proc = run_cli("sala-train", f"dataset={entry}", f"stage={stage}", *extra, "dataset.max_samples=40",
                   "dataset.cutoff_len=256", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    assert evals(tmp_path / "run")[-1]["step"] == 2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dataset"]["name"] == entry
    # The run says what it trains on, and every record it read is kept or said dropped (DPO at this
    # cutoff drops prompts that fill it: only sala-data said so, the run was silent).
    linked = [tmp_path / "data" / name for name in files]  # (a file, or a directory of train.json and dev.json)
    files = [p for path in linked for p in (sorted(path.glob("*.json")) if path.is_dir() else [path])]
    records = sum(min(40, len(json.loads(p.read_text(encoding="utf-8")))) for p in files)
    (summary,) = re.findall(r"^sala-train: data: (.*)$", proc.stdout, re.MULTILINE)
    kept = sum(int(n) for n in re.findall(r"(?:train|validation) (\d+) samples", summary))
    dropped = re.findall(r"^sala-train: WARNING: (\d+) (?:train|validation) records dropped \((.*?)\)", proc.stdout,
                         re.MULTILINE)  # fmt: skip
    assert kept + sum(int(n) for n, _ in dropped) == records, (summary, dropped)
    if stage == "dpo":
        assert dropped and all("prompt fills dataset.cutoff_len" in why for _, why in dropped), proc.stdout


@pytest.mark.parametrize(("stage", "entry", "mix"), MIXES)
def test_guide_data_sets_mixed_as_llamafactory_lists_them(tmp_path, stage, entry, mix):
    """Each entry's files, format and columns, read as its own entry reads them, train in the mix."""
    if not GUIDE.is_dir():
        pytest.skip(f"the guide's data is not at {GUIDE}")
    (tmp_path / "data").mkdir()
    for name in (entry, *mix):
        for file, source in GUIDE_ENTRIES[name][1].items():
            os.symlink(GUIDE / source, tmp_path / "data" / file)
    proc = run_cli("sala-train", f"stage={stage}", f"dataset={entry}", f"dataset.mix=[{','.join(mix)}]",
                   "dataset.max_samples=40", "dataset.cutoff_len=256", "train.max_steps=2", "train.eval_steps=2",
                   "train.save_steps=2", "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    assert evals(tmp_path / "run")[-1]["step"] == 2
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["dataset"]
    assert (
        recorded["name"] == entry
        and [m["name"] for m in recorded["mixed"]] == mix
        and all(Path(m["train"][0]).is_absolute() for m in recorded["mixed"])
    )


def test_sala_data_shows_preference_tokens_and_bad_records(tmp_path):
    proc = run_cli("sala-data", "stage=dpo", "dataset=demo_preference", BLOCKS, "preview=2", "preview_format=jsonl",
                   cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [sorted(r) for r in rows] == [["chosen_ids", "index", "prompt_ids", "rejected_ids", "split"]] * 2
    assert "train: 200 samples kept, 0 dropped" in proc.stderr
    mean, longest = map(float, re.search(r"per sequence: mean ([\d.]+), max (\d+)", proc.stderr).groups())
    assert mean <= longest  # chosen and rejected are separate sequences, counted as such

    bad = tmp_path / "bad.jsonl"
    shutil.copy(Path(__file__).parents[2] / "sala_train/assets/data/demo_kto/train.jsonl", bad)
    with bad.open("a") as fh:
        fh.write(json.dumps({"prompt": "Q", "completion": "A", "label": "maybe"}) + "\n")
    common = ("stage=kto", "dataset=demo_kto", BLOCKS, f"dataset.train=[{bad}]")
    failed = run_cli("sala-data", *common, cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert f"{bad}:201: label not a boolean: 'label' is 'maybe', expected true or false" in failed.stderr
    skipped = run_cli("sala-data", *common, "dataset.on_error=skip", cwd=tmp_path)
    assert_ok(skipped)
    assert "train: 200 samples kept, 1 dropped" in skipped.stdout  # the report is the output here
    assert "dropped 1: bad record: label not a boolean" in skipped.stdout


def test_dpo_step_weighs_every_pair_alike_in_any_batch_layout(tmp_path):
    """5 pairs in one step: batches of 5, or of 4 then 1 accumulated. TRL's loss is its batch's
    mean and the Trainer averaged the two means: the pair alone weighed 4 times each other one.
    Rows padded to a multiple of 64 (``train.pad_to_multiple_of``, passed to TRL's collator) change nothing."""
    common = ("stage=dpo", "dataset=demo_preference", "dataset.max_samples=5", *METHODS["full"], "train.max_steps=1",
              "train.warmup_steps=0", "train.logging_steps=1", "train.eval_on_start=false")  # fmt: skip
    layouts = {"whole": ("train.per_device_train_batch_size=5", "train.gradient_accumulation_steps=1"),
               "split": ("train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2"),
               "rounded": ("train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=2",
                           "train.pad_to_multiple_of=64")}  # fmt: skip
    steps = {}
    for name, layout in layouts.items():
        assert_ok(run_cli("sala-train", *common, *layout, f"hydra.run.dir={name}", cwd=tmp_path))
        (steps[name],) = [r for r in metrics(tmp_path / name) if r["event"] == "train"]
    for figure in ("loss", "grad_norm"):
        assert steps["whole"][figure] == pytest.approx(steps["split"][figure], rel=1e-5), (figure, steps)
        assert steps["whole"][figure] == pytest.approx(steps["rounded"][figure], rel=1e-5), (figure, steps)
    trl_args = torch.load(tmp_path / "rounded" / "final" / "training_args.bin", weights_only=False)
    assert trl_args.pad_to_multiple_of == 64  # (TRL's collator got it)


def test_kto_pairs_for_its_kl_term_stay_within_the_models_positions(tmp_path):
    """KTO's KL term joins each prompt with another sample's completion, cut at dataset.cutoff_len:
    above a model's positions (every sample checked fits them), a long prompt with a long reply
    ran past them; a GPT-2's learned positions failed mid-training (IndexError, exit 1)."""
    from tests.conftest import TINY_CHAT

    model = tmp_path / "gpt2-100"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_CHAT / name, model / name)
    (model / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 981, "n_positions": 100,
        "n_embd": 64, "n_layer": 2, "n_head": 2, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}))  # fmt: skip
    long_prompt = "Please read this long note about the weather in the old town near the river and the hills: "
    long_reply = "Snow is white because it reflects all colours of light equally, so it looks white in the sun. "

    def record(i: int) -> dict:
        prompt, reply = (long_prompt + "what colour is snow?", "White.") if i % 2 == 0 else ("Snow?", long_reply)
        return {"prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": reply}], "label": i % 4 < 2}  # fmt: skip

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(record(i)) + "\n" for i in range(16)))
    proc = run_cli("sala-train", "stage=kto", "dataset=demo_kto", f"dataset.train=[{data}]",
                   f"dataset.validation=[{data}]", "dataset.cutoff_len=512", "model=hf", f"model.name_or_path={model}",
                   "model.from_scratch=true", "model.dtype=float32", "model.attn_implementation=eager",
                   "method.target_modules=[c_attn]", "train.max_steps=2", "train.eval_on_start=false",
                   "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
