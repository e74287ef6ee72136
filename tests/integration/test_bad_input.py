"""Every kind of bad input: one clear message, exit code 2, no traceback, no run directory left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_CHAT, run_cli

pytestmark = pytest.mark.slow

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def files(tmp: Path) -> dict[str, str]:
    (tmp / "good.jsonl").write_text(json.dumps(GOOD) + "\n" * 1)
    (tmp / "broken.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"messages": [\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin1.jsonl").write_bytes(  # a Latin-1 é on line 2
        json.dumps(GOOD).encode() + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    )
    odd = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, GOOD["messages"][1]]}
    (tmp / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [GOOD, odd]))
    desirable = {"prompt": GOOD["messages"][:1], "completion": GOOD["messages"][1:], "label": True}
    (tmp / "desirable.jsonl").write_text(json.dumps(desirable) + "\n")
    (tmp / "sub").mkdir()
    # (a ragged CSV and a val_size leaving no train are in tests/unit/test_formats.py)
    names = ("good.jsonl", "broken.jsonl", "empty.jsonl", "latin1.jsonl", "odd.jsonl", "desirable.jsonl")
    return {name.split(".")[0]: str(tmp / name) for name in names}


# (case, overrides, message); {good}, {broken}, ... name the data files written by files().
CASES = [
    ("missing file", ["dataset=messages", "dataset.train=[nowhere.jsonl]", "dataset.validation=[{good}]"],
     "dataset.train[0]: file not found"),
    ("malformed JSON", ["dataset=messages", "dataset.train=[{broken}]", "dataset.validation=[{good}]"],
     "broken.jsonl:2: malformed JSON line"),
    ("empty data set", ["dataset=messages", "dataset.train=[{empty}]", "dataset.validation=[{good}]"],
     "empty.jsonl: file is empty"),
    ("not UTF-8", ["dataset=messages", "dataset.train=[{latin1}]", "dataset.validation=[{good}]"],
     "latin1.jsonl:2: not UTF-8: byte 0xe9 at column 47"),
    ("a list where text belongs", ["dataset=messages", "dataset.train=[{odd}]", "dataset.validation=[{good}]"],
     "odd.jsonl:2: not text: messages[0] (user): 'content' is a list, expected text"),
    ("no validation set", ["dataset=messages", "dataset.train=[{good}]"],
     "dataset.validation: a validation set is required"),
    ("cutoff shorter than the template", ["dataset.cutoff_len=8"], "every sample was dropped"),
    ("LoRA target matching nothing", ["method=lora", "method.target_modules=[no_such_proj]"],
     "method.target_modules=['no_such_proj']"),
    # (peft adapts the names that match and drops a misspelt one without a word: only q_proj trained)
    ("LoRA target misspelt beside one that matches", ["method=lora", "method.target_modules=[q_proj,v_prj]"],
     "method.target_modules=['q_proj', 'v_prj']: v_prj matches no module of LlamaForCausalLM (peft would adapt the "
     "others alone); its linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("LoRA target holding its layers", ["method=lora", "method.target_modules=[self_attn]"],
     "method.target_modules=['self_attn']: a target is a LlamaAttention, which holds layers rather than being one; "
     "LoRA adapts Linear, Embedding and Conv layers"),  # (peft's message printed the module's whole structure)
    ("LoRA regex beside names", ["method=lora", "method.target_modules=[q_proj,'.*v_proj']"],
     "'.*v_proj' is a regex, which peft takes alone, over whole module names"),
    # (peft trains none of a modules_to_save name that matches nothing, without a word)
    ("LoRA module to save misspelt", ["method=lora", "method.modules_to_save=[embed_tokns]"],
     "method.modules_to_save=['embed_tokns']: embed_tokns matches no module of LlamaForCausalLM; its modules: act_fn, "
     "down_proj, embed_tokens,"),
    # (peft's TypeError traceback: "modules_to_save cannot be applied to modules of type ...lora.layer.Linear")
    ("LoRA module adapted and trained whole", ["method=lora", "method.modules_to_save=[lm_head]"],
     "method.modules_to_save=['lm_head']: lm_head is also adapted by LoRA (model.lora_target_modules="),
    ("LoRA on a head tied to embeddings trained whole", ["method=lora", "method.modules_to_save=[embed_tokens]"],
     "method.modules_to_save=['embed_tokens']: this model ties embed_tokens to lm_head, which LoRA adapts"),
    ("LLaMA-Factory's name for a LoRA key", ["method=lora", "method.lora_rank=8"],
     "method.lora_rank: unknown key; LLaMA-Factory's lora_rank is method.r (with method=lora)"),
    ("unknown model path", ["model=hf", "model.name_or_path=./no/such/model"], "local model directory not found"),
    ("a model path naming a file", ["model=hf", "model.name_or_path={good}"],
     "good.jsonl is a file, not a model directory (the folder with its config.json)"),
    # models/nope is a hub id by its shape (it may not be downloaded yet); beside a models/ directory
    # the message says what a local path would have been missing
    ("a local path without ./", ["model=hf", "model.name_or_path=sub/nope"], "/sub has no 'nope'; a local path may"),
    ("tool format for the tokenizer's own template", ["dataset.tool_format=qwen"],
     "dataset.tool_format: applies to dataset.template=chatml or cpm4"),
    ("mutually exclusive options", ["train.bf16=true", "train.fp16=true"], "train.bf16 / train.fp16"),
    # (KTO's margin needs both labels: the Trainer's KeyError at the first checkpoint, which it never saved)
    ("a best-checkpoint figure the validation set cannot give",
     ["stage=kto", "dataset=demo_kto", "method=full", "dataset.validation=[{desirable}]",
      "train.load_best_model_at_end=true", "train.metric_for_best_model=rewards/margins", "train.save_steps=100"],
     "train.metric_for_best_model=rewards/margins: the validation split holds only desirable samples"),
    # accelerate would train in float32 without a word (the CI machines have no GPU)
    ("fp16 on CPU", ["train.fp16=true"], "train.fp16=true needs a CUDA GPU: on CPU accelerate silently trains"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "overrides", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_message_and_exit_2(tmp_path, case, overrides, message):
    paths = files(tmp_path)
    args = [o.format(**paths) for o in overrides]
    proc = run_cli("sala-train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert "Failed to" not in proc.stderr  # datasets' own log lines come before ours
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_sala_data_refuses_what_sala_train_would(tmp_path):
    """Samples longer than the model's positions: sala-data says so as sala-train does, not 'fine'."""
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "la " * 5000}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n" + json.dumps(GOOD) + "\n")
    proc = run_cli("sala-data", "dataset=messages", "dataset.train=[long.jsonl]", "dataset.validation=[long.jsonl]",
                   "dataset.cutoff_len=100000", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "exceed the 4096 positions of" in proc.stderr and "set dataset.cutoff_len=4096" in proc.stderr


def test_slurm_without_sbatch_is_one_message_and_leaves_no_run(tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH with no SLURM client on it
    proc = run_cli("sala-train", "launcher=slurm", "backend=ddp", "hydra.run.dir=run", cwd=tmp_path,
                   env={"PATH": str(tmp_path / "bin")})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "launcher=slurm: sbatch is not on PATH" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["unresolvable host", "port held by another program"])
def test_a_rendezvous_endpoint_a_node_cannot_use_is_one_message_in_seconds(tmp_path, where):
    """torchrun retried an unknown host for 90 s, ending in C++ stack frames; and joined a port held
    by a program that is not a torch rendezvous, then waited in silence for about 15 minutes."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never answers
        if where == "unresolvable host":
            endpoint = ["launcher.master_addr=no-such-host.invalid"]  # (.invalid never resolves: RFC 6761)
            message = "launcher.master_addr: 'no-such-host.invalid' does not resolve on this machine"
        else:
            port = silent.getsockname()[1]
            endpoint = ["launcher.master_addr=127.0.0.1", f"launcher.master_port={port}"]
            message = f"launcher.master_port: a program that is not a torch rendezvous holds 127.0.0.1:{port}"
        proc = run_cli("sala-train", "launcher=multinode", "backend=ddp", "launcher.nproc_per_node=1",
                       "launcher.node_rank=1", *endpoint, "hydra.run.dir=run", cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "meets the other nodes" not in proc.stderr  # (refused before torchrun started)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launch", [[], ["backend=ddp", "launcher.nproc_per_node=2"]], ids=["runner", "launcher"])
def test_a_bad_record_is_found_before_torch_and_transformers_load(tmp_path, launch):
    """Reading the files needs neither; importing them takes most of the seconds a run needs to start.
    One process: the runner reads them first. Several: the launcher does, before starting any."""
    paths = files(tmp_path)
    args = [*launch, "dataset=messages", f"dataset.train=[{paths['broken']}]", f"dataset.validation=[{paths['good']}]"]
    proc = run_cli("sala-train", *args, "hydra.run.dir=run", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2 and "broken.jsonl:2: malformed JSON line" in proc.stderr, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "datasets" in imported  # the import log is there, from the launcher and the runner
    assert not {"torch", "transformers"} & imported


def test_a_revision_on_a_model_built_from_config_trains(tmp_path):
    """``model.revision`` names the config's files; the model built from that config takes none
    (transformers' from_config raised a TypeError for it). A hub model, cached as the hub leaves
    one (offline); a local directory given a revision is refused: its own files load, unpinned."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = tmp_path / "hub" / "models--me--tiny"
    shutil.copytree(TINY_CHAT, cached / "snapshots" / commit, ignore=shutil.ignore_patterns("__*"))
    (cached / "refs").mkdir()
    (cached / "refs" / "v1").write_text(commit)
    hub = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    short = ("hydra.run.dir=run", "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1")
    proc = run_cli("sala-train", "model.name_or_path=me/tiny", "model.revision=v1", *short, cwd=tmp_path, env=hub)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "run" / "final").is_dir()
    # The adapter names the revision it was trained on (AutoPeftModelForCausalLM loaded main's).
    adapter = __import__("json").loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["revision"] == "v1" and adapter["base_model_name_or_path"] == "me/tiny"
    (tmp_path / "local").mkdir()
    proc = run_cli("sala-train", "model.revision=v1", *short, cwd=tmp_path / "local")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        f"model.revision=v1: model.name_or_path={TINY_CHAT} is a local directory, whose own files load" in proc.stderr
    )
    assert not (tmp_path / "local" / "run").exists()


def test_remote_code_that_is_not_trusted_is_refused_before_the_data_is_tokenized(tmp_path):
    """transformers loaded the tokenizer (warning of a model "of type ``"), the data was tokenized,
    and then its refusal of the config asked for its own argument, ``trust_remote_code=True``."""
    from tests.fixtures.tiny_sala import make_tiny_sala

    model = make_tiny_sala(tmp_path / "tiny-sala", TINY_CHAT)
    # (and by a dry run, which said nothing of it: exit 0, "# memory: no estimate")
    for dry_run in ("false", "true"):
        proc = run_cli("sala-train", "model=hf", f"model.name_or_path={model}", "hydra.run.dir=run",
                       f"launcher.dry_run={dry_run}", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            "sala-train: 1 config problem:",
            f"  - model.name_or_path={model}: its config.json names its own code (auto_map), which runs only with "
            "model.trust_remote_code=true: read that code, then set it",
        ]
        assert not (tmp_path / "run").exists()


def test_relative_paths_mean_from_where_the_command_ran_also_with_hydra_job_chdir(tmp_path):
    """hydra.job.chdir=true makes the run directory the current one before sala-train resolves the
    config: the data files named relative to the command's directory are still found there."""
    paths = files(tmp_path)
    proc = run_cli("sala-train", "hydra.job.chdir=true", "hydra.run.dir=run", "dataset=messages",
                   "dataset.train=[good.jsonl]", "dataset.validation=[good.jsonl]", "launcher.dry_run=true",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"- {paths['good']}" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["cwd"] == str(tmp_path)


def test_a_damaged_weights_file_or_a_template_that_refuses_a_turn_is_one_message(tmp_path):
    """A download cut short, and a template that raises on system turns (as Gemma's and Mistral's
    do): both were tracebacks with exit 1 and a run directory left behind."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tmp_path / "model"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CHAT)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_CHAT / name, model / name)
    refusing = tmp_path / "refusing"
    shutil.copytree(model, refusing)
    template = (TINY_CHAT / "chat_template.jinja").read_text()
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (refusing / "chat_template.jinja").write_text(refuse + template)
    as_bin = tmp_path / "bin"  # the older format: torch.load's zip reader fails on it
    shutil.copytree(model, as_bin)
    (as_bin / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(model).state_dict(), as_bin / "pytorch_model.bin")
    for weights in (model / "model.safetensors", as_bin / "pytorch_model.bin"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expected = {
        model: f"model.name_or_path={model}: a weights file is damaged or incomplete (Error while deserializing "
        "header: incomplete metadata",
        as_bin: f"model.name_or_path={as_bin}: a weights file is damaged or incomplete (PytorchStreamReader failed",
        refusing: "the chat template failed on the turns [system, user] of the conversation beginning",
    }
    for path, message in expected.items():
        proc = run_cli("sala-train", "model=hf", f"model.name_or_path={path}", "train.bf16=false",
                       "train.max_steps=1", "hydra.run.dir=run", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_a_datasets_cache_path_that_cannot_be_a_directory_is_one_message(tmp_path):
    """HF_DATASETS_CACHE naming a file, or a path under one: datasets' makedirs traceback (EEXIST,
    ENOTDIR), exit 1, and a failed run directory left behind."""
    (tmp_path / "afile").write_text("")
    for cache in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        proc = run_cli("sala-train", "hydra.run.dir=run", "train.max_steps=1", cwd=tmp_path,
                       env={"HF_DATASETS_CACHE": str(cache)})  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"sala-train: the datasets cache {cache}: cannot write in it (it, or a directory above it, is a file); "
            "set HF_DATASETS_CACHE to a directory with room that you can write in"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # A directory above the cache that cannot be made (HF_HOME=/proc/nope, where nothing can be
    # created): the error names that directory, not a path inside the cache: a traceback, exit 1.
    proc = run_cli("sala-train", "hydra.run.dir=run", "train.max_steps=1", cwd=tmp_path,
                   env={"HF_DATASETS_CACHE": "/proc/sala-no-such-dir/datasets"})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "sala-train: the datasets cache /proc/sala-no-such-dir/datasets: cannot write in it" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_datasets_cache_that_cannot_be_written_is_one_message(tmp_path):
    """datasets writes its cache (lock and Arrow files) as it reads the data: a read-only cache was
    an OSError traceback, exit 1, with config.yaml, provenance.json and status.json left behind."""
    import subprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        expected = (f"the datasets cache {cache}: cannot write in it (Read-only file system); set HF_DATASETS_CACHE "
                    "to a directory with room that you can write in")  # fmt: skip
        for command in (("sala-train", "hydra.run.dir=run", "train.max_steps=1"), ("sala-data",)):
            proc = run_cli(*command, cwd=tmp_path, env={"HF_DATASETS_CACHE": str(cache)})
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines()[-1] == f"{command[0]}: {expected}"
        # Reached through a link (a home cache linked to scratch space): datasets names its files
        # under the real path, which was taken for a file elsewhere and re-raised as a traceback.
        (tmp_path / "hf_home").symlink_to(tmp_path)
        proc = run_cli("sala-train", "hydra.run.dir=run", "train.max_steps=1", cwd=tmp_path,
                       env={"HF_DATASETS_CACHE": "hf_home/cache"})  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "the datasets cache hf_home/cache: cannot write in it (Read-only file system)" in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "hf_home"]
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_a_hub_model_running_its_own_code_unpinned_is_warned_with_the_commit_to_pin(tmp_path):
    """Unpinned, its code and weights are the hub's main as it is: once main moves, a resume or
    export finds other files and refuses them, and a rerun trains another model."""
    import shutil

    from tests.fixtures.tiny_sala import make_tiny_sala

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    cached = tmp_path / "hub" / "models--me--sala"
    make_tiny_sala(cached / "snapshots" / commit, TINY_CHAT)
    shutil.rmtree(cached / "snapshots" / commit / "__pycache__", ignore_errors=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    short = ("hydra.run.dir=run", "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1")
    proc = run_cli("sala-train", "model=hf", "model.name_or_path=me/sala", "model.trust_remote_code=true", *short,
                   cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = ("sala-train: WARNING: model.name_or_path=me/sala runs its own code (trust_remote_code) and "
               "model.revision is not set: a later resume, export or rerun takes the hub's main as it is then; "
               f"pin model.revision={commit}")  # fmt: skip
    assert proc.stderr.count(warning) == 1
