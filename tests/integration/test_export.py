"""sala-export: a LoRA run merged into a plain model whose logits equal the adapter model's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import SHARES_FULL_RUN, TINY_CHAT, run_cli
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

    # One of the run's own checkpoints, named relative to the run.
    assert_ok(run_cli("sala-export", "run", "--checkpoint", "checkpoint-8", "--out", "at8", cwd=tmp_path))
    assert (tmp_path / "at8" / "model.safetensors").is_file()

    # A run trained with sala_varlen (a GPU run's directory, copied here): its kernel takes packed
    # 16-bit batches on CUDA only, so the check loaded nothing ("needs a CUDA GPU"); the weights are
    # the same whatever attention computes the check.
    varlen = tmp_path / "varlen"
    shutil.copytree(run, varlen, ignore=shutil.ignore_patterns("export"))
    cfg["model"]["attn_implementation"] = "sala_varlen"
    (varlen / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_ok(run_cli("sala-export", "varlen", cwd=tmp_path))
    from safetensors.torch import load_file

    plain, from_varlen = (load_file(d / "export" / "model.safetensors") for d in (run, varlen))
    assert plain.keys() == from_varlen.keys() and all(torch.equal(plain[k], from_varlen[k]) for k in plain)
    # MiniCPM-SALA's preset trains with flash_attention_2 (CUDA, 16 bits): it was refused on CPU
    # ("use model.attn_implementation=sdpa", which sala-export does not take) and would have run
    # flash-attn on float32 CPU tensors on a GPU machine.
    flash = tmp_path / "flash"
    shutil.copytree(run, flash, ignore=shutil.ignore_patterns("export"))
    cfg["model"]["attn_implementation"] = "flash_attention_2"
    (flash / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_ok(run_cli("sala-export", "flash", cwd=tmp_path))
    from_flash = load_file(flash / "export" / "model.safetensors")
    assert all(torch.equal(plain[k], from_flash[k]) for k in plain)
    # Weights readable as any other file written here (safetensors writes them 0600: a serving
    # process under another account could not read an export, a final/ or a checkpoint).
    import os

    umask = os.umask(0o22)
    os.umask(umask)
    for weights in (export / "model.safetensors", run / "final" / "adapter_model.safetensors",
                    run / "checkpoint-8" / "adapter_model.safetensors"):  # fmt: skip
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask, weights

    # SIGTERM (kill, a job's time limit) or SIGHUP (its SSH session gone) while the merged model is
    # written: the hidden temporary directory is removed, as for Ctrl-C; one line, exit 128 + the
    # signal. (The signal is sent from inside the write, after the weights and before the tokenizer,
    # so the test does not race the export.)
    script = tmp_path / "export_terminated.py"
    script.write_text(
        "import os, signal, sys\n"
        "from transformers import PreTrainedTokenizerBase\n"
        "from sala_train import export\n"
        "save = PreTrainedTokenizerBase.save_pretrained\n"
        "def terminated(self, directory, *args, **kwargs):\n"
        "    assert os.path.isfile(os.path.join(directory, 'model.safetensors'))\n"
        "    os.kill(os.getpid(), getattr(signal, os.environ['STOP_WITH']))\n"
        "    return save(self, directory, *args, **kwargs)\n"
        "PreTrainedTokenizerBase.save_pretrained = terminated\n"
        "export.main(sys.argv[1:])\n"
    )
    for stop in (signal.SIGTERM, signal.SIGHUP):  # (SIGHUP left its model-sized directory behind)
        env = {**os.environ, "STOP_WITH": stop.name}
        proc = subprocess.run([sys.executable, str(script), "run", "--out", "stopped"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
        assert proc.returncode == 128 + stop and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"sala-export: stopped by {stop.name}; no merged model was written" in proc.stderr
        assert not (tmp_path / "stopped").exists() and not list(tmp_path.glob(".stopped*"))
    # Under nohup (SIGHUP ignored from the start) the session's end does not stop it.
    env = {**os.environ, "STOP_WITH": "SIGHUP"}

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, str(script), "run", "--out", "kept"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env, preexec_fn=nohup)  # fmt: skip
    assert proc.returncode == 0 and (tmp_path / "kept" / "model.safetensors").is_file(), proc.stderr[-2000:]


def test_rslora_dora_a_regex_and_a_module_trained_whole_train_and_export(tmp_path):
    """LLaMA-Factory's use_rslora, use_dora and additional_target (``method.modules_to_save``), and
    peft's regex targets, which a one-item list looked for as a literal module name. The adapter
    reloads with plain peft onto the run's base and its export gives its logits; the embeddings
    trained whole stay tied to the head, as the base's were."""
    import json

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    regex = r".*\.(q_proj|v_proj)"
    assert_ok(run_cli("sala-train", "method=lora", "method.r=4", "method.use_rslora=true", "method.use_dora=true",
                      f"method.target_modules='{regex}'", "method.modules_to_save=[embed_tokens]",
                      "hydra.run.dir=run", *SHORT, cwd=tmp_path))  # fmt: skip
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 8 and adapter["use_rslora"] and adapter["use_dora"]  # (alpha null: 2 × r)
    assert adapter["target_modules"] == regex and "embed_tokens" in adapter["modules_to_save"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["alpha"] == 8
    assert_ok(run_cli("sala-export", "run", cwd=tmp_path))
    torch.manual_seed(42)  # (train.seed's default: the tiny base is built from its config)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT))
    embeddings = base.get_input_embeddings().weight.detach().clone()
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    names = [name for name, _ in adapted.named_modules()]
    assert any(n.endswith("q_proj.lora_magnitude_vector") for n in names)  # DoRA
    assert not any(".k_proj.lora_" in n for n in names)  # the regex's modules alone
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert (merged.get_input_embeddings().weight - embeddings).abs().max() > 1e-3  # trained whole
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_module_trained_whole_beside_an_adapted_tied_head_exports(tmp_path):
    """peft's weight tying, asked for every modules_to_save, also tied the LoRA on the tiny model's
    lm_head to the embeddings (adapter_config.json named model.embed_tokens), which sala-export then
    refused: "2 weight(s) in it are targeted by no module". It is asked for only when the embeddings
    or head are trained whole."""
    assert_ok(run_cli("sala-train", "method=lora", "method.modules_to_save=[model.norm]", "hydra.run.dir=run", *SHORT,
                      cwd=tmp_path))  # fmt: skip
    assert_ok(run_cli("sala-export", "run", cwd=tmp_path))


def test_a_bfloat16_lora_run_is_merged_in_float32_and_saved_in_bfloat16(tmp_path):
    """MiniCPM-SALA's preset trains in bfloat16: merging there, the merge's and the adapter's
    roundings alone differed by more than the check allows, so no bf16 run could be exported.
    The adapter is on the input embeddings, which the tiny model ties to its head: the export
    unties them (merged into the shared tensor, the head changed too and the check refused it)."""
    import json

    from safetensors import safe_open

    lora = run_cli("sala-train", "method=lora", "model.dtype=bfloat16", "hydra.run.dir=run", "train.max_steps=2",
                   "train.eval_steps=2", "train.save_steps=2", "train.learning_rate=1e-2",
                   "method.target_modules=[q_proj,v_proj,embed_tokens]", cwd=tmp_path)  # fmt: skip
    assert_ok(lora)
    assert "float32 master copy" not in lora.stdout + lora.stderr  # (an adapter trains in float32)
    full = run_cli("sala-train", "method=full", "model.dtype=bfloat16", "hydra.run.dir=full", "train.max_steps=1",
                   "train.eval_steps=1", "train.save_steps=1", cwd=tmp_path)  # fmt: skip
    assert_ok(full)
    assert ("sala-train: WARNING: method=full on backend=single trains the bfloat16 weights themselves, with no "
            "float32 master copy") in full.stdout + full.stderr  # fmt: skip
    proc = run_cli("sala-export", "run", cwd=tmp_path)
    assert_ok(proc)
    (diff,) = re.findall(r"max \|merged - adapter\| = (\S+)", proc.stdout)
    assert float(diff) < 1e-4  # float32: the merge itself is exact to rounding
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    with safe_open(str(export / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118 (no __iter__)


def test_export_refuses_what_it_cannot_export_in_one_line(tmp_path):
    """Each refusal is one message naming the argument or file, exit 2, nothing written."""
    import json
    import shutil

    assert_ok(run_cli("sala-train", "method=lora", "hydra.run.dir=run", "train.max_steps=2", "train.eval_steps=2",
                      "train.save_steps=2", cwd=tmp_path))  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "run", other)
    (tmp_path / "afile").write_text("")
    adapter = other / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[:8] = b"\xff" * 8  # same size (the manifest check passes), unreadable header
    adapter.write_bytes(bytes(data))
    diverged = tmp_path / "diverged"  # a checkpoint saved after the weights became NaN
    shutil.copytree(tmp_path / "run", diverged)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    nan_adapter = diverged / "checkpoint-2" / "adapter_model.safetensors"
    size = nan_adapter.stat().st_size
    with safe_open(str(nan_adapter), "pt") as fh:
        metadata = fh.metadata()
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(nan_adapter).items()}
    save_file(tensors, nan_adapter, metadata=metadata)
    assert nan_adapter.stat().st_size == size  # the manifest still matches: only the values say it
    status = json.loads((other / "status.json").read_text())
    (other / "status.json").write_text(json.dumps({**status, "status": "preempted"}))
    damaged = {name: tmp_path / name for name in ("badcfg", "nofinal", "badadapter")}
    for path in damaged.values():
        shutil.copytree(tmp_path / "run", path)
    (damaged["badcfg"] / "config.yaml").write_text("a: [\n")
    shutil.rmtree(damaged["nofinal"] / "final")
    (damaged["badadapter"] / "final" / "adapter_config.json").write_text('{"r": ')
    # adapter_config.json as JSON that is no LoRA config (peft's AttributeError or TypeError, exit 1);
    # the chat template the run saved with its adapter gone (blamed on config.yaml, advising a
    # dataset.template); a run that failed before its first checkpoint (no advice at all)
    notlora, notemplate, failed = tmp_path / "notlora", tmp_path / "notemplate", tmp_path / "failed"
    for path in (notlora, notemplate, failed):
        shutil.copytree(tmp_path / "run", path)
    (notlora / "final" / "adapter_config.json").write_text("{}")
    (notemplate / "final" / "chat_template.jinja").unlink()
    shutil.rmtree(failed / "final")
    shutil.rmtree(failed / "checkpoint-2")
    status = json.loads((failed / "status.json").read_text())
    (failed / "status.json").write_text(json.dumps({**status, "status": "failed"}))
    nobase = tmp_path / "nobase"  # its base model's directory has gone (moved, deleted)
    shutil.copytree(tmp_path / "run", nobase)
    config = (nobase / "config.yaml").read_text()
    assert str(TINY_CHAT) in config
    (nobase / "config.yaml").write_text(config.replace(str(TINY_CHAT), str(tmp_path / "gone" / "tiny-chat")))
    import yaml

    nodata, newkey = tmp_path / "nodata", tmp_path / "newkey"  # validation data moved; a key this version lacks
    for path in (nodata, newkey):
        shutil.copytree(tmp_path / "run", path)
    edited = yaml.safe_load((nodata / "config.yaml").read_text())
    edited["dataset"]["validation"] = [str(tmp_path / "moved.json")]
    (nodata / "config.yaml").write_text(yaml.safe_dump(edited))
    edited = yaml.safe_load((newkey / "config.yaml").read_text())
    edited["train"]["from_a_later_version"] = 1
    (newkey / "config.yaml").write_text(yaml.safe_dump(edited))
    (tmp_path / "taken").mkdir()
    # An adapter file without some of the weights its config targets (peft only warned, and the
    # merge dropped their training), one whose config targets fewer modules than it holds (their
    # weights dropped without a word), and one without its weights file at all (a hub error).
    partial, narrowed, noweights = tmp_path / "partial", tmp_path / "narrowed", tmp_path / "noweights"
    for path in (partial, narrowed, noweights):
        shutil.copytree(tmp_path / "run", path)
    weights = partial / "final" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        metadata = fh.metadata()
    kept = {k: v for k, v in load_file(weights).items() if ".layers.0." not in k}
    save_file(kept, weights, metadata=metadata)
    adapter_config = json.loads((narrowed / "final" / "adapter_config.json").read_text())
    targets = sorted(adapter_config["target_modules"])
    adapter_config["target_modules"] = targets[1:]
    (narrowed / "final" / "adapter_config.json").write_text(json.dumps(adapter_config))
    (noweights / "final" / "adapter_model.safetensors").unlink()
    cases = {
        ("partial",): f"{partial}/final/adapter_model.safetensors: ",
        ("narrowed",): f"{narrowed}/final/adapter_model.safetensors: ",
        ("noweights",): f"{noweights}/final: adapter_model.safetensors missing; nothing was written",
        ("nodata",): f"{nodata}/config.yaml: the logit check reads the run's validation data: {tmp_path}/moved.json",
        ("newkey",): f"{newkey}/config.yaml: train.from_a_later_version: unknown key",
        ("badcfg",): f"{damaged['badcfg']}/config.yaml: not the config sala-train wrote (while parsing a flow",
        ("nofinal",): f"{damaged['nofinal']}: final/ is missing, though the run completed; pass --checkpoint",
        ("nobase",): f"{nobase}: its base model, model.name_or_path={tmp_path}/gone/tiny-chat, is no longer there",
        ("badadapter",): f"{damaged['badadapter']}/final/adapter_config.json: cannot be read, it is damaged (Expecting",
        ("notlora",): f"{notlora}/final/adapter_config.json: not a LoRA adapter's config (no peft_type LORA and",
        ("notemplate",): f"{notemplate}/final: its tokenizer has no chat template, though the run saved the one it",
        ("failed",): f"{failed}: the run is failed; only a completed run's final/ is exported; rerun the run's command",
        ("run", "--out", "taken"): f"{tmp_path}/taken: already exists; remove it, or choose another --out",
        ("run", "--samples", "0"): "argument --samples: must be a whole number of at least 1, not '0'",
        ("run", "--out", "afile/merged"): f"--out {tmp_path}/afile/merged: {tmp_path}/afile is a file",
        ("run", "--out", "/proc/merged"): "--out /proc/merged: cannot write in /proc (",  # (root may, by os.access)
        ("run", "--checkpoint", "other/checkpoint-2"): f"not a checkpoint of {tmp_path}/run (expected",
        ("run", "--checkpoint", "checkpoint-9"): "checkpoint-9: missing, or left incomplete",
        ("other",): f"{other}: the run is preempted; only a completed run's final/ is exported; pass --checkpoint",
        ("other", "--checkpoint", "checkpoint-2"): f"{other}/checkpoint-2: cannot be loaded, a file in it is damaged",
        ("diverged", "--checkpoint", "checkpoint-2"): "logits are not finite (NaN or inf): its weights diverged",
    }
    for args, message in cases.items():
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = run_cli("sala-export", *args, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        if args == ("partial",):
            missing = r": \d+ weight\(s\) that adapter_config.json targets are not in it \(first: \S*layers\.0\."
            assert re.search(missing, proc.stderr) and "Found missing adapter keys" not in proc.stderr, proc.stderr
        if args == ("narrowed",):
            assert re.search(rf"\d+ weight\(s\) in it are targeted by no module of adapter_config.json \(first: "
                             rf"\S*{targets[0]}", proc.stderr), proc.stderr  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "run" / "export").exists()
    assert not (other / "export").exists() and not list(other.glob(".export*"))
    assert not (diverged / "export").exists()
    # A disk that fills while the weights are written (safetensors' own SafetensorError, not an OSError).
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode == 0:  # root
        try:
            # (into folders still to be made: those it made are removed too)
            proc = run_cli("sala-export", "run", "--out", str(small / "a" / "b" / "merged"), cwd=tmp_path)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert f"--out {small}/a/b/merged: could not write the merged model (" in proc.stderr
            assert list(small.iterdir()) == []
        finally:
            subprocess.run(["umount", str(small)], check=True)
    # Only the validation data is read: the train and test files may be gone by the time of the export.
    notrain = tmp_path / "notrain"
    shutil.copytree(tmp_path / "run", notrain)
    edited = yaml.safe_load((notrain / "config.yaml").read_text())
    assert edited["dataset"]["validation"] and edited["dataset"]["val_size"] is None
    edited["dataset"]["train"], edited["dataset"]["test"] = [str(tmp_path / "gone.json")], [str(tmp_path / "gone.json")]
    (notrain / "config.yaml").write_text(yaml.safe_dump(edited))
    assert_ok(run_cli("sala-export", "notrain", cwd=tmp_path))
    # A bare checkpoint-N is the run's own, even where the current directory has one of that name.
    (tmp_path / "checkpoint-2").mkdir()
    assert_ok(run_cli("sala-export", "run", "--checkpoint", "checkpoint-2", "--out", "at2", cwd=tmp_path))


def test_exports_to_one_out_each_write_their_own_copy(tmp_path, monkeypatch):
    """Two exports to one ``--out`` (a second started while the first seemed to hang) shared one
    temporary directory: one removed the other's, and the first renamed the second's half-written
    copy into place and said it had written the model. Here the other export finishes while this
    one writes; and a copy left by a killed export is removed, one of a live process kept."""
    from sala_train import atomic, export
    from sala_train.config.typed import ConfigError

    assert_ok(run_cli("sala-train", "method=lora", "hydra.run.dir=run", "train.max_steps=2", "train.eval_steps=2",
                      "train.save_steps=2", cwd=tmp_path))  # fmt: skip
    out = tmp_path / "merged"
    host = __import__("socket").gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".merged.partial-{host}-{int(dead.stdout)}"  # (that process has ended)
    alive = tmp_path / f".merged.partial-{host}-1"  # (init: a live process's)
    elsewhere = tmp_path / ".merged.partial-another-host-12"
    for path in (abandoned, alive, elsewhere):
        path.mkdir()
        (path / "model.safetensors").write_text("")
    written = []

    def the_other_export_finishes(directory):
        written.append(directory)
        out.mkdir()
        (out / "model.safetensors").write_text("the other export's")
        return atomic.readable_weights(directory)

    monkeypatch.setattr(export, "readable_weights", the_other_export_finishes)
    with pytest.raises(ConfigError, match="written meanwhile by another command"):
        export.export(tmp_path / "run", out)
    assert written == [tmp_path / f".merged.partial-{host}-{os.getpid()}"]  # its own copy, now removed
    assert (out / "model.safetensors").read_text() == "the other export's"
    assert sorted(p.name for p in tmp_path.glob(".merged.partial-*")) == sorted([alive.name, elsewhere.name])


@SHARES_FULL_RUN
def test_full_run_is_not_exported(full_run, tmp_path):
    before = snapshot(full_run)
    proc = run_cli("sala-export", "run", cwd=full_run.parent)
    assert proc.returncode == 2 and "method=full" in proc.stderr and "already a plain model" in proc.stderr
    assert snapshot(full_run) == before  # no export/ begun
    diverged = tmp_path / "diverged"  # a full run that failed: no final/ to point to
    diverged.mkdir()
    shutil.copy(full_run / "config.yaml", diverged)
    (diverged / "status.json").write_text('{"status": "failed", "exit_code": 1}')
    proc = run_cli("sala-export", "diverged", cwd=tmp_path)
    assert proc.returncode == 2 and "method=full and the run is failed, with no final/" in proc.stderr, proc.stderr
    missing = run_cli("sala-export", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "not a sala-train run directory" in missing.stderr
    # --checkpoint of a full run: the checkpoint is itself the model (it was "final/ is already a
    # plain model", as if --checkpoint had not been read); one sharded for resuming is not.
    proc = run_cli("sala-export", "run", "--checkpoint", "checkpoint-3", cwd=full_run.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"--checkpoint checkpoint-3: method=full, so the checkpoint is a whole model already, nothing to merge: "
            f"load {full_run / 'checkpoint-3'} itself") in proc.stderr  # fmt: skip
    sharded = diverged / "checkpoint-2"  # (FSDP's: shards and states, no config.json or model*.safetensors)
    sharded.mkdir()
    (sharded / "pytorch_model_fsdp_0").mkdir()
    (sharded / "sala_checkpoint.json").write_text('{"files": {}}')  # (published)
    proc = run_cli("sala-export", "diverged", "--checkpoint", "checkpoint-2", cwd=tmp_path)
    assert proc.returncode == 2 and "the checkpoint holds no whole model (sharded by the backend" in proc.stderr
    assert "the run's final/, once it completes, is its plain model" in proc.stderr
    # Not one of the run's published checkpoints: said so, as for a LoRA run's.
    for other, said in (("checkpoint-99", "missing, or left incomplete"), ("final", "not a checkpoint of"),
                        (str(full_run / "checkpoint-3"), "not a checkpoint of")):  # fmt: skip
        proc = run_cli("sala-export", "diverged", "--checkpoint", other, cwd=tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(full_run) == before


def test_a_checkpoint_pruned_while_it_is_exported_is_said_to_be_removed_not_damaged(tmp_path):
    """The run, still training under train.save_total_limit, removed the checkpoint an export was
    reading: that was reported as a damaged file."""
    from sala_train.config.typed import ConfigError
    from sala_train.export import _damaged

    checkpoint = tmp_path / "checkpoint-33"
    checkpoint.mkdir()  # (its manifest, unlinked first by the prune, gone)
    with pytest.raises(ConfigError) as caught, _damaged(checkpoint):
        raise FileNotFoundError("Can't find 'adapter_config.json'")
    assert caught.value.problems[0].startswith(f"{checkpoint}: removed while it was read (the run, still training")
    final = tmp_path / "final"
    final.mkdir()
    with pytest.raises(ConfigError) as caught, _damaged(final):
        raise FileNotFoundError("Can't find 'adapter_config.json'")
    assert "a file in it is damaged" in caught.value.problems[0]


def test_a_base_model_changed_since_training_is_refused_for_export_and_resume(tmp_path):
    """The adapter merged into other weights of the same shapes loaded, ran and passed the logit
    check (the adapter model and its merge share the wrong base); a resumed run went on from them.

    The base's config.json has a layer more than its weights: transformers draws that layer at
    random, and the export drew other values than the run (the caller's random state, not the
    run's seed), so the merged model was not the one trained; the logit check compares the adapter
    model with its own merge, which share that base."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def save_base(seed: int) -> None:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).save_pretrained(tmp_path / "base")
        config = json.loads((tmp_path / "base" / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))

    save_base(0)
    AutoTokenizer.from_pretrained(TINY_CHAT).save_pretrained(tmp_path / "base")
    args = ("sala-train", "method=lora", "model.name_or_path=base", "model.from_scratch=false", "hydra.run.dir=run",
            "train.max_steps=8", "train.eval_steps=8", "train.save_steps=4")  # fmt: skip
    assert_ok(run_cli(*args, cwd=tmp_path))
    assert (tmp_path / "run" / "base_weights.json").is_file()
    shutil.rmtree(tmp_path / "run" / "checkpoint-8")
    shutil.rmtree(tmp_path / "run" / "final")
    save_base(1)  # the directory overwritten by another model of the same shapes
    resumed = run_cli(*args, cwd=tmp_path)
    problem = f"model.name_or_path={tmp_path / 'base'}: its weights are not the ones this run started from, recorded"
    assert resumed.returncode == 2 and problem in resumed.stderr and "Traceback" not in resumed.stderr
    assert "(model.safetensors differs); resuming would go on from another base model" in resumed.stderr
    assert not (tmp_path / "run" / "checkpoint-8").exists()
    # A checkpoint copied out of its run is compared with the record it keeps (sala_run_base_weights.json).
    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "best")
    copied = run_cli(*[a.replace("=run", "=fresh") for a in args], f"train.resume={tmp_path / 'best'}", cwd=tmp_path)
    assert copied.returncode == 2 and problem in copied.stderr and "Traceback" not in copied.stderr
    assert f"recorded in {tmp_path / 'best' / 'sala_run_base_weights.json'}" in copied.stderr
    assert not (tmp_path / "fresh").exists()
    exported = run_cli("sala-export", "run", "--checkpoint", "checkpoint-4", cwd=tmp_path)
    assert exported.returncode == 2 and problem in exported.stderr and "Traceback" not in exported.stderr
    assert "the adapter would be merged into another base model than it was trained on" in exported.stderr
    assert not (tmp_path / "run" / "export").exists()
    save_base(0)  # put back: both go on
    assert_ok(run_cli(*args, cwd=tmp_path))
    assert_ok(run_cli("sala-export", "run", cwd=tmp_path))
    # The adapter model built independently: the base as transformers loads it with the run's seed.
    from peft import PeftModel

    torch.manual_seed(42)  # (train.seed's default)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.config.num_hidden_layers == 3
    adapter_model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapter_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_a_base_given_a_chat_template_stops_where_its_trained_replies_end(tmp_path):
    """A base whose eos is <|endoftext|>, with no template of its own, fine-tuned under
    dataset.template=chatml: its replies are trained to end with <|im_end|>, and final/ and the
    export kept the base's generation config, which stops at eos only, so the model generated
    <|im_end|><|im_end|>... to the token limit (under plain generate() and vLLM alike)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # (and no pad token: the run pads with eos, which final/ and the export record as the pad id)
    base = AutoConfig.from_pretrained(TINY_CHAT, eos_token_id=0, pad_token_id=None)
    AutoModelForCausalLM.from_config(base).save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template = "<|endoftext|>", None, None
    tokenizer.save_pretrained(tmp_path / "base")
    assert GenerationConfig.from_pretrained(tmp_path / "base").eos_token_id == 0
    assert AutoConfig.from_pretrained(tmp_path / "base").pad_token_id is None
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    common = ("model.name_or_path=base", "model.from_scratch=false", "dataset.template=chatml", "train.max_steps=2",
              "train.eval_steps=2", "train.save_steps=2")  # fmt: skip
    said = "generation will stop at <|im_end|> too, which the chat template ends replies with"
    for method in ("lora", "full"):
        proc = run_cli("sala-train", f"method={method}", f"hydra.run.dir={method}", *common, cwd=tmp_path)
        assert_ok(proc)
        assert said in proc.stderr + proc.stdout
    assert GenerationConfig.from_pretrained(tmp_path / "full" / "final").eos_token_id == [0, im_end]
    assert_ok(run_cli("sala-export", "lora", cwd=tmp_path))
    export = tmp_path / "lora" / "export"
    assert GenerationConfig.from_pretrained(export).eos_token_id == [0, im_end]
    assert AutoTokenizer.from_pretrained(export).eos_token == "<|endoftext|>"  # (the tokenizer as trained)
    for model in (tmp_path / "full" / "final", export):
        assert AutoConfig.from_pretrained(model).pad_token_id == 0, model
        assert GenerationConfig.from_pretrained(model).pad_token_id == 0, model
    # Pre-training on text puts no template on it: the base's stops are kept. On conversations,
    # which the template renders into its documents, the model learns <|im_end|> too.
    proc = run_cli("sala-train", "stage=pretrain", "dataset=demo_text", "method=full", "hydra.run.dir=pt",
                   *(a for a in common if "template" not in a), cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    assert said not in proc.stderr + proc.stdout
    assert GenerationConfig.from_pretrained(tmp_path / "pt" / "final").eos_token_id == 0
    proc = run_cli("sala-train", "stage=pretrain", "dataset=demo_chat", "method=full", "hydra.run.dir=ptchat",
                   *common, cwd=tmp_path)  # fmt: skip
    assert_ok(proc)
    assert said in proc.stderr + proc.stdout
    assert GenerationConfig.from_pretrained(tmp_path / "ptchat" / "final").eos_token_id == [0, im_end]


def test_a_full_fine_tune_from_scratch_resumes_under_another_seed(tmp_path):
    """A full fine-tune's checkpoint holds every weight it trains on, so the seed that drew its
    from-scratch base is not compared on resume (it was refused, advising to put the base back);
    a LoRA run's frozen base is that seed's draw, so there it is refused (by the config check)."""
    short = ("train.eval_steps=2", "train.save_steps=2", "train.eval_on_start=false", "dataset.max_samples=16")
    assert_ok(run_cli("sala-train", "method=full", "hydra.run.dir=full", "train.max_steps=2", *short, cwd=tmp_path))
    assert_ok(run_cli("sala-train", "method=full", "hydra.run.dir=full", "train.max_steps=4", "train.seed=7",
                      f"train.resume={tmp_path / 'full' / 'checkpoint-2'}", *short, cwd=tmp_path))  # fmt: skip
    assert (tmp_path / "full" / "checkpoint-4").is_dir()
    assert_ok(run_cli("sala-train", "method=lora", "hydra.run.dir=lora", "train.max_steps=2", *short, cwd=tmp_path))
    proc = run_cli("sala-train", "method=lora", "hydra.run.dir=lora", "train.max_steps=4", "train.seed=7",
                   f"train.resume={tmp_path / 'lora' / 'checkpoint-2'}", *short, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the base model it adapts); resume with that run's values" in proc.stderr
    assert "train.seed: 42 -> 7" in proc.stderr
