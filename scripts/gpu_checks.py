"""The GPU checks of the distributed (3) and throughput (6) issues, as one prepared script.

Run once on a borrowed one-GPU machine, within one wall-clock budget (``--budget-s``), the steps
in order of value:

1. ``varlen``: tests/unit/test_packing.py, whose real varlen-kernel tests (packed loss against
   padded; a sliding-window model's against sdpa's) run only on CUDA;
2. ``throughput-full``, ``throughput-lora``: benchmarks/throughput.py on the 1.1B Llama; passed
   when every layout was measured and issue 6's targets are met (``throughput_targets``);
3. ``batch-shapes``: benchmarks/batch_shapes.py, what a padded batch's new width costs; passed when
   widths rounded as ``train.pad_to_multiple_of`` does beat exact widths met for the first time;
4. ``fsdp-full``, ``fsdp-lora``, ``zero3-full``, ``zero3-lora``: a ~100M-parameter random-init
   Llama trained 8 steps through the real CLI (``python -m sala_train.cli``), its ``final/``
   reloaded with plain transformers/peft and scored on the run's whole validation split, in the
   run's precision; passed when that loss is the one the run logged at its last eval (within
   1e-3 relative) and, for LoRA, when it is clearly off the untrained base model's. ZeRO-3 loads
   the model's random weights saved (as a downloaded model: partitioned under zero.Init, which the
   run must say), and ``zero3-full`` packs, so the packing check runs on the gathered model;
5. ``fsdp-best``: the tiny demo model trained under FSDP with ``train.load_best_model_at_end`` and
   NEFTune, its eval loss falling then rising: ``final/`` must be the best checkpoint's (loaded
   from FSDP's sharded checkpoint), reloaded and scored as in 4 against that checkpoint's eval.

Each step gets at most its own cap and what is left of the budget; a step with too little left
is skipped. Work happens in a temporary directory; ``$OUT`` (or ./gpu-checks) receives only
``results.json`` and ``logs.txt`` (the end of every step's log), rewritten after every step.
Exit code 0 only when every check passed.

    python scripts/gpu_checks.py                 # on the GPU machine
    python scripts/gpu_checks.py --cpu-dry-run   # here, first: tiny model, zero3 only, on CPU

A GPU machine without network gets the packages its image lacks as wheels (scripts/gpu_wheels.sh
makes .whl/, which travels with the working tree); its command then starts with their install:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    bash scripts/gpu_wheels.sh --check /tmp/site; PYTHONUNBUFFERED=1 python3 scripts/gpu_checks.py
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # sala_train and throughput.model_dir

from sala_train.atomic import write_text_atomic  # noqa: E402  (after the path above)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
# A short run whose saved weights differ clearly from the starting ones: no warm-up, a high
# learning rate, and LoRA on the output head too (with the random head frozen, adapters in the
# blocks alone barely move the loss of a random-init model).
SHORT_RUN = ("train.max_steps=8", "train.save_steps=4", "train.eval_steps=8", "train.logging_steps=2",
             "train.warmup_steps=0", "train.eval_on_start=true", "dataset.cutoff_len=512")  # fmt: skip
LEARNING_RATE = {"full": "0.0001", "lora": "0.001"}
LORA_TARGETS = "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
REL_TOL = 1e-3  # reloaded against logged eval loss (bf16 training)
MOVED_FACTOR = 10  # LoRA: trained against base loss, in tolerances
LOG_TAIL = 60
RELOAD_RESERVE_S = 20.0  # left after a training run for the reload and scoring


@dataclass
class Session:
    out: Path
    work: Path
    deadline: float
    dry_run: bool
    results: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def model(self) -> Path:
        """The random-init Llama's directory (config and tokenizer), made once."""
        size = "tiny" if self.dry_run else "125m"
        if size not in self.models:
            from throughput import model_dir

            self.models[size] = model_dir(size, self.work)
        return self.models[size]

    def saved_model(self) -> Path:
        """The same model with random weights saved beside its config: loaded as a downloaded one
        is (``model.from_scratch=false``), so ZeRO-3 loads it partitioned."""
        if "saved" not in self.models:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            source = self.model()
            target = self.work / f"{source.name}-saved"
            shutil.copytree(source, target)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
            self.models["saved"] = target
        return self.models["saved"]


# A check fills its entry with figures (kept even when it raises) and returns whether it passed.
Check = Callable[[Session, Path, float, dict[str, Any]], bool]


@dataclass(frozen=True)
class Step:
    name: str
    check: Check
    cap_s: float
    min_s: float  # skipped with less than this left
    reserve_s: float = 0.0  # kept back from the subprocess's timeout for work after it
    needs_cuda: bool = True


# --- running commands ---------------------------------------------------------------------------


def child_env(dry_run: bool) -> dict[str, str]:
    """Offline, with this repository first on the path (there is no console script to rely on)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **OFFLINE, "PYTHONPATH": path}
    if dry_run:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed on CPU (the runner sets it too when CUDA is absent)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launcher starts torchrun and the ranks in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for target in [pid, *descendants(pid)]:  # all found before any dies (orphans lose their parent)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)


def run_logged(cmd: list[str], log: Path, cwd: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """(exit code, or None when killed at the timeout; seconds), output appended to ``log``."""
    start = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            fh.write(f"\ngpu_checks: killed after {timeout:.0f} s (the step's time limit)\n")
            code = None
    return code, time.monotonic() - start


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def error_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def failure(code: int | None, log: Path, timeout: float) -> str:
    if code is None:
        return f"timed out after {timeout:.0f} s"
    return f"exit {code}: {last_line(log)}"


# --- step 1: the varlen GPU test ------------------------------------------------------------------


def varlen_check(session: Session, log: Path, timeout: float, entry: dict[str, Any]) -> bool:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider", "tests/unit/test_packing.py"]
    code, _ = run_logged(cmd, log, REPO, timeout, child_env(session.dry_run))
    summary = re.findall(r"^=*\s*(\d+ \w+.*) in [\d.]+s", log.read_text(errors="replace"), re.MULTILINE)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", " ".join(summary))}
    entry |= {"exit": code, "summary": summary[-1] if summary else None, **counts}
    if code != 0:
        entry["error"] = failure(code, log, timeout)
        return False
    if counts.get("skipped", 0):
        entry["error"] = "a test was skipped: the varlen kernel test did not run"
        return False
    return True


# --- step 2: training through the CLI, final/ reloaded -------------------------------------------


def train_command(model: Path, backend: str, method: str, run_dir: Path, bf16: bool, saved: bool = False,
                  packing: bool = False) -> list[str]:  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "sala_train.cli",
        "model=hf",
        f"model.name_or_path={model}",
        f"model.from_scratch={str(not saved).lower()}",
        f"train.packing={str(packing).lower()}",
        f"backend={backend}",
        "launcher.nproc_per_node=1",
        f"method={method}",
        f"hydra.run.dir={run_dir}",
        *SHORT_RUN,
        f"train.learning_rate={LEARNING_RATE[method]}",
        f"train.bf16={str(bf16).lower()}",
        "model.liger=false",
    ]  # fmt: skip  (these check sharded training and saving; the benchmark times Liger)
    return [*cmd, LORA_TARGETS] if method == "lora" else cmd


def logged_losses(run_dir: Path) -> dict[str, Any]:
    """The eval losses the run logged: at its last eval, and at step 0 (``eval_on_start``)."""
    from sala_train.metrics import eval_curve, read_metrics

    curve = eval_curve(read_metrics(run_dir))
    if not curve:
        raise RuntimeError(f"no eval event in {run_dir / 'metrics.jsonl'}")
    step, loss = curve[-1]
    start = [value for at, value in curve if at == 0]
    return {"logged_eval_step": step, "logged_eval_loss": loss, "logged_start_eval_loss": start[0] if start else None}


def mean_eval_loss(model: Any, batches: list[dict[str, Any]], device: str, autocast: Any) -> float:
    """The loss the run logs (sala_train.evaluation.model_loss): each batch's mean token loss,
    weighted by its trained tokens."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            context = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
            with context:
                loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            trained = int((batch["labels"][..., 1:] != -100).sum())
            total += trained * float(loss) if trained else 0.0
            tokens += trained
    return total / tokens


def precision_modes(bf16: bool, fp16: bool, backend: str) -> list[tuple[str, Any, Any]]:
    """(name, weights' dtype, autocast's dtype or None) to score in, the run's own first: DeepSpeed
    runs the module in 16-bit throughout; FSDP keeps float32 weights under accelerate's autocast
    (its residual stream and norms in float32: on the H100 bf16 weights scored 9.5e-4 relative off
    its logged eval, 2026-12-05, when this scored only 16-bit weights)."""
    import torch

    if not (bf16 or fp16):
        return [("float32", torch.float32, None)]
    dtype = torch.bfloat16 if bf16 else torch.float16
    name = "bfloat16" if bf16 else "float16"
    modes = [(name, dtype, None), (f"float32+{name} autocast", torch.float32, dtype)]
    return modes[::-1] if backend.startswith("fsdp") else modes


def reload_losses(run_dir: Path, method: str, backend: str, entry: dict[str, Any]) -> None:
    """Score the untrained base model (seeded as the run built it) and ``final/`` loaded with
    plain transformers (and peft), on the run's whole validation split in its eval batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from sala_train.config import io
    from sala_train.config.schema import RunConfig
    from sala_train.data.build import build_data
    from sala_train.data.collators import PadToLongestCollator
    from sala_train.models import load_model, load_tokenizer

    cfg = io.load(RunConfig, run_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    rows = list(build_data(cfg.stage, cfg.dataset, tokenizer).splits["validation"])
    size = cfg.train.per_device_eval_batch_size
    collate = PadToLongestCollator(pad_token_id=tokenizer.pad_token_id)
    batches = [collate(rows[i : i + size]) for i in range(0, len(rows), size)]
    modes = precision_modes(cfg.train.bf16, cfg.train.fp16, backend)
    liger = importlib.util.find_spec("liger_kernel") is not None
    entry |= {"validation_samples": len(rows), "eval_batch_size": size, "precision": modes[0][0],
              "liger": f"model.liger={cfg.model.liger.value}, package {'present' if liger else 'absent'}"}  # fmt: skip

    def scores(model: Any) -> dict[str, float]:
        """In each mode, float32 weights first (a cast to 16 bit and back would round them)."""
        out = {}
        for name, weights, autocast in sorted(modes, key=lambda mode: mode[1] != torch.float32):
            out[name] = mean_eval_loss(model.to(device, weights).eval(), batches, device, autocast)
        return {name: out[name] for name, _, _ in modes}

    attn = cfg.model.attn_implementation.value
    base = load_model(cfg.model, seed=cfg.train.seed)  # the from-scratch model, seeded as the run built it
    base_scores = scores(base.to(device, torch.float32))
    entry["base_eval_loss"] = base_scores[modes[0][0]]
    if method == "lora":
        from peft import PeftModel

        # (scored above, base was cast to 16 bit: the adapters go on the unrounded model, again)
        base = load_model(cfg.model, seed=cfg.train.seed).to(torch.float32)
        model = PeftModel.from_pretrained(base, str(run_dir / "final"))
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        entry |= {"lora_B_tensors": len(lora_b), "lora_B_abs_sum": float(sum(p.abs().sum() for p in lora_b))}
    else:
        del base
        model = AutoModelForCausalLM.from_pretrained(
            run_dir / "final", dtype=torch.float32, attn_implementation=attn, use_kernels=False
        )
    trained = scores(model)
    entry["reloaded_eval_loss"] = trained[modes[0][0]]
    entry["reloaded_eval_loss_by_precision"] = trained
    entry["base_eval_loss_by_precision"] = base_scores
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def verdict(method: str, entry: dict[str, Any]) -> bool:
    """Reloaded == logged within REL_TOL (in the run's precision, or the other way of computing in
    16 bit, recorded as ``matched_precision``); LoRA: trained clearly off the base."""
    logged = entry["logged_eval_loss"]
    tolerance = REL_TOL * abs(logged)
    differences = {name: abs(value - logged) for name, value in entry["reloaded_eval_loss_by_precision"].items()}
    matched = [name for name, diff in differences.items() if diff <= tolerance]
    moved = abs(entry["reloaded_eval_loss"] - entry["base_eval_loss"])
    entry |= {"tolerance": tolerance, "reload_difference": differences[entry["precision"]],
              "matched_precision": matched[0] if matched else None, "moved_from_base": moved}  # fmt: skip
    problems = [] if matched else [f"reloaded loss off the logged {logged:.6f} by more than {tolerance:.2e}"]
    if method == "lora" and moved <= MOVED_FACTOR * tolerance:
        needed = MOVED_FACTOR * tolerance
        problems.append(f"LoRA loss moved only {moved:.2e} from the base model's (needs > {needed:.2e})")
    if problems:
        entry["error"] = "; ".join(problems)
    return not problems


def training_check(backend: str, method: str) -> Check:
    def check(session: Session, log: Path, timeout: float, entry: dict[str, Any]) -> bool:
        run_dir = session.work / f"{backend}-{method}"
        saved, packing = backend == "zero3", backend == "zero3" and method == "full"
        model = session.saved_model() if saved else session.model()
        cmd = train_command(model, backend, method, run_dir, bf16=not session.dry_run, saved=saved, packing=packing)
        code, seconds = run_logged(cmd, log, session.work, timeout, child_env(session.dry_run))
        entry |= {"exit": code, "train_seconds": round(seconds, 1)}
        if code != 0:
            entry["error"] = failure(code, log, timeout)
            return False
        text = log.read_text(errors="replace")
        said = {"partitioned": "loaded partitioned under ZeRO-3 (zero.Init)", "packing": "packing check passed"}
        wanted = [key for key, on in (("partitioned", saved), ("packing", packing)) if on]
        entry |= {key: next((line for line in text.splitlines() if said[key] in line), None) for key in wanted}
        if missing := [said[key] for key in wanted if entry[key] is None]:
            entry["error"] = f"the run did not say: {'; '.join(missing)}"
            return False
        entry |= logged_losses(run_dir)
        start = time.monotonic()
        try:
            reload_losses(run_dir, method, backend, entry)
        finally:
            entry["reload_seconds"] = round(time.monotonic() - start, 1)
        return verdict(method, entry)

    return check


# --- step 4 (run last): the best checkpoint as final/ under FSDP, with NEFTune on CUDA ---------

# The eval loss falls, then rises (a learning rate warming up to one too high): final/ must be the
# best checkpoint's, loaded through FSDP's sharded checkpoint (untested without a GPU), with
# NEFTune's generator on the GPU.
FALLS_THEN_RISES = ("model=tiny", "method=full", "train.learning_rate=0.3",
                    "train.lr_scheduler_type=constant_with_warmup", "train.warmup_steps=16", "train.max_steps=8",
                    "train.eval_steps=2", "train.save_steps=4", "train.logging_steps=1", "train.eval_on_start=true",
                    "train.load_best_model_at_end=true", "train.neftune_noise_alpha=5", "launcher.nproc_per_node=1",
                    "model.liger=false")  # fmt: skip


def best_checkpoint_check(session: Session, log: Path, timeout: float, entry: dict[str, Any]) -> bool:
    from sala_train.metrics import eval_curve, read_metrics

    backend = "zero3" if session.dry_run else "fsdp"  # (the dry run tries the plumbing on CPU)
    run_dir = session.work / f"{backend}-best"
    cmd = [sys.executable, "-m", "sala_train.cli", *FALLS_THEN_RISES, f"backend={backend}",
           f"train.bf16={str(not session.dry_run).lower()}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    code, seconds = run_logged(cmd, log, session.work, timeout, child_env(session.dry_run))
    entry |= {"exit": code, "train_seconds": round(seconds, 1), "backend": backend}
    if code != 0:
        entry["error"] = failure(code, log, timeout)
        return False
    evals = dict(eval_curve(read_metrics(run_dir)))
    best = min((4, 8), key=lambda step: evals[step])
    said = re.search(r"final/ holds the weights of checkpoint-(\d+)", log.read_text(errors="replace"))
    entry |= {"eval_losses": evals, "best_saved_step": best, "final_from": int(said[1]) if said else None}
    if best == 8:
        entry["error"] = "the last step scored best: loading a checkpoint was not exercised"
        return False
    if entry["final_from"] != best:
        entry["error"] = f"final/ should hold checkpoint-{best}'s weights (the run said {entry['final_from']})"
        return False
    entry |= {"logged_eval_step": best, "logged_eval_loss": evals[best], "logged_start_eval_loss": evals.get(0)}
    reload_losses(run_dir, "full", backend, entry)
    return verdict("full", entry)


# --- step 3: throughput -----------------------------------------------------------------------------


def throughput_check(method: str) -> Check:
    def check(session: Session, log: Path, timeout: float, entry: dict[str, Any]) -> bool:
        report = session.work / f"throughput-{method}.json"
        # The dry run only tries the plumbing, with a load 2 busy CPU cores finish inside the cap.
        # Five warm-up steps: Triton compiles Liger's kernels again for some new lengths in the first ones.
        load = ["--size", "tiny", "--steps", "4", "--warmup", "1", "--max-length", "512"] if session.dry_run else [
            "--size", "1b", "--steps", "15", "--warmup", "5"]  # fmt: skip
        cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--method", method, *load,
               "--json", str(report)]  # fmt: skip
        code, _ = run_logged(cmd, log, session.work, timeout, child_env(session.dry_run))
        entry["exit"] = code
        layouts = json.loads(report.read_text()) if report.exists() else []  # a timeout keeps the ended ones
        entry["layouts"] = layouts
        if code != 0:
            entry["error"] = failure(code, log, timeout)
            return False
        unmeasured = [f"{r['layout']}: {r.get('error')}" for r in layouts if r["tokens_per_s"] is None]
        if unmeasured:  # the benchmark reports a refused or out-of-memory layout and goes on
            entry["error"] = "not measured: " + "; ".join(unmeasured)
            return False
        counted = {r["layout"]: r.get("tokens") for r in layouts}
        if len(set(counted.values())) != 1 or not all(counted.values()):  # (every layout trains the same samples)
            entry["error"] = f"the layouts train the same samples, yet counted these tokens: {counted}"
            return False
        entry["targets"] = throughput_targets(method, {r["layout"]: r for r in layouts})
        missed = [name for name, target in entry["targets"].items() if not target["met"]]
        if missed and not session.dry_run:  # (a tiny model on 2 busy CPU cores has no targets)
            entry["error"] = "missed: " + ", ".join(missed)
            return False
        return True

    return check


def batch_shapes_check(session: Session, log: Path, timeout: float, entry: dict[str, Any]) -> bool:
    """benchmarks/batch_shapes.py: what a padded batch's new shape costs, and whether
    ``train.pad_to_multiple_of``'s rounding pays it back (on a GPU: rounded faster than exact widths
    met for the first time)."""
    report = session.work / "batch-shapes.json"
    load = ["--size", "tiny", "--passes", "4"] if session.dry_run else ["--size", "1b"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "batch_shapes.py"), *load, "--json", str(report)]
    code, _ = run_logged(cmd, log, session.work, timeout, child_env(session.dry_run))
    entry["exit"] = code
    rows = json.loads(report.read_text()) if report.exists() else []
    entry["scenarios"] = rows
    if code != 0:
        entry["error"] = failure(code, log, timeout)
        return False
    exact, rounded = rows[0], rows[2]
    if not session.dry_run and rounded["tokens_per_s"] <= exact["tokens_per_s"]:
        entry["error"] = "rounded widths were no faster than exact widths met for the first time"
        return False
    return True


def throughput_targets(method: str, layouts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 6's targets for sala-train's defaults (the packed layout) against the guide layout
    measured in the same run: full fine-tuning 6.5x, 55k real tokens/s, 35% MFU of 989 TFLOP/s
    (H100 and H200 SXM alike), peak memory no higher; LoRA 5x."""
    guide, packed = layouts["guide"], layouts["packed"]
    ratio = packed["tokens_per_s"] / guide["tokens_per_s"]
    targets = {"vs_guide": at_least(ratio, 5.0 if method == "lora" else 6.5)}
    if method == "full":
        targets["tokens_per_s"] = at_least(packed["tokens_per_s"], 55_000.0)
        targets["mfu"] = at_least(packed["mfu"], 0.35)
        targets["peak_gib"] = at_most(packed["peak_gib"], guide["peak_gib"])
    return targets


def at_least(value: float | None, target: float) -> dict[str, Any]:
    return {"value": value, "at_least": target, "met": value is not None and value >= target}


def at_most(value: float | None, target: float | None) -> dict[str, Any]:
    met = value is not None and target is not None and value <= target
    return {"value": value, "at_most": target, "met": met}


# --- the session ---------------------------------------------------------------------------------


def steps(dry_run: bool) -> list[Step]:
    train_cap, train_min = (300.0, 60.0) if dry_run else (90.0, 60.0)
    pairs = [(backend, method) for backend in ("fsdp", "zero3") for method in ("full", "lora")]
    training = [
        Step(f"{b}-{m}", training_check(b, m), train_cap, train_min, RELOAD_RESERVE_S, needs_cuda=b == "fsdp")
        for b, m in pairs
    ]
    throughput = [
        Step(f"throughput-{method}", throughput_check(method), 150.0, 90.0, needs_cuda=False)
        for method in ("full", "lora")
    ]
    # Issue 6's checks first, with the padded batches' shapes (train.pad_to_multiple_of, never
    # measured on a GPU yet), then issue 3's (each also run on CPU in CI), then the best checkpoint under FSDP.
    best = Step("fsdp-best", best_checkpoint_check, train_cap, train_min, RELOAD_RESERVE_S, needs_cuda=False)
    shapes = Step("batch-shapes", batch_shapes_check, 90.0, 30.0, needs_cuda=False)
    return [Step("varlen", varlen_check, 120.0, 30.0), *throughput, shapes, *training, best]


def run_step(session: Session, step: Step) -> None:
    entries: dict[str, Any] = session.results["steps"]
    left = session.left()
    if step.needs_cuda and session.dry_run:
        entries[step.name] = {"status": "skipped", "reason": "needs CUDA (--cpu-dry-run)"}
        return
    if left - step.reserve_s < step.min_s:
        entries[step.name] = {"status": "skipped", "reason": f"{left:.0f} s left of the budget, needs {step.min_s:.0f}"}
        return
    timeout = min(step.cap_s, left - step.reserve_s)
    entry: dict[str, Any] = {"status": "running", "timeout_s": round(timeout)}
    entries[step.name] = entry
    write_outputs(session)
    log = session.work / f"{step.name}.log"
    session.logs[step.name] = log
    start = time.monotonic()
    try:
        passed = step.check(session, log, timeout, entry)
        entry["status"] = "passed" if passed else "failed"
    except Exception as exc:  # recorded; the next step still runs
        with log.open("a") as fh:
            fh.write("gpu_checks: " + "".join(traceback.format_exception(exc)))
        entry |= {"status": "error", "error": error_line(exc)}
    entry["seconds"] = round(time.monotonic() - start, 1)


def all_passed(session: Session) -> bool:
    """Every step passed; in a dry run the CUDA-only steps, skipped, do not count."""
    return all(
        entry["status"] == "passed" or (session.dry_run and entry.get("reason", "").startswith("needs CUDA"))
        for entry in session.results["steps"].values()
    )


def write_outputs(session: Session) -> None:
    """results.json and logs.txt in $OUT, each replaced whole (a killed session leaves the last)."""
    session.results["all_passed"] = all_passed(session)
    session.results["elapsed_s"] = round(session.results["budget_s"] - session.left(), 1)
    sections = []
    for name, log in session.logs.items():
        status = session.results["steps"].get(name, {}).get("status")
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        header = f"===== {name}: {status} (last {min(LOG_TAIL, len(lines))} of {len(lines)} lines) ====="
        sections.append("\n".join([header, *lines[-LOG_TAIL:]]))
    write_text_atomic(session.out / "results.json", json.dumps(session.results, indent=2) + "\n")
    write_text_atomic(session.out / "logs.txt", "\n\n".join(sections) + "\n")


def machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, zero3 only, on CPU")
    # 540: a lent machine runs one command for at most 600 s, and the wheels install before this script
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock seconds for every step together")
    parser.add_argument("--work", type=Path, help="where runs and logs go (default: a new temporary directory)")
    parser.add_argument("--steps", help="comma-separated step names to run, in their usual order (default: all); "
                        "a second command on the same machine reruns the steps the first skipped for time")  # fmt: skip
    args = parser.parse_args()
    chosen = steps(args.cpu_dry_run)
    if args.steps:
        names = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = sorted(set(names) - {step.name for step in chosen})
        if unknown:
            parser.error(f"--steps: no step {', '.join(unknown)} (steps: {', '.join(s.name for s in chosen)})")
        chosen = [step for step in chosen if step.name in names]
    deadline = time.monotonic() + args.budget_s
    out = Path(os.environ.get("OUT") or "gpu-checks").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    work.mkdir(parents=True, exist_ok=True)
    session = Session(out, work, deadline, args.cpu_dry_run)
    session.results = {"dry_run": args.cpu_dry_run, "budget_s": args.budget_s, "work": str(work), "steps": {}}
    try:
        session.results["machine"] = machine()
    except Exception as exc:
        session.results["machine"] = {"error": error_line(exc)}
    for step in chosen:
        run_step(session, step)
        write_outputs(session)
        print(f"gpu_checks: {step.name}: {json.dumps(session.results['steps'][step.name])}", flush=True)
    write_outputs(session)
    print(json.dumps(session.results, indent=2), flush=True)
    return 0 if session.results["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
