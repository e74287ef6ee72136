"""Real tokens/s of the guide's data layout against sala-train's, through sala-train's own runner.

Every layout trains the same random-init model on the same synthetic chats (lengths drawn from a
log-normal with a long right tail: with the bundled tokenizer a median of about 240 tokens and a
mean of about 330), the same samples per step, in this one process, through
``sala_train.runner.prepare`` (the Trainer the CLI builds):

- ``guide``: every sample padded to ``--max-length`` (the guide's finetune.py), in micro-batches
  of ``--micro-batch`` samples accumulated to the step (the guide's own: 2, with 4 accumulated),
  without Liger's kernels, as finetune.py runs (it runs first: Liger patches transformers' Llama
  modules for the rest of the process);
- ``padded``: dynamic padding (each micro-batch to its longest sample, rounded up to a multiple of
  64 on a GPU: ``train.pad_to_multiple_of``'s default);
- ``packed``: sala-train's packing (``train.packing=true``): the step's samples in one padding-free
  row (on CUDA with the ``sala_varlen`` attention kernel, on CPU with sdpa's block-diagonal mask),
  with Liger's kernels where ``model.liger=auto`` applies them (CUDA, liger-kernel installed).

Prints real (non-padding) tokens/s, MFU against the GPU's peak (``--peak-tflops``), peak memory
and each layout's ratio to the guide layout. MFU counts the matrix products of the non-embedding
weights: 6 FLOPs per weight and token for full fine-tuning (forward, input gradients, weight
gradients), 4 plus 2 per trained weight for LoRA (frozen weights get no gradients). A layout that
runs out of GPU memory is reported as such and the others still run. With no arguments on a
machine without a GPU it runs a tiny model as a smoke check (1 to 2 minutes on 2 cores).

    python benchmarks/throughput.py                       # CPU smoke check
    python benchmarks/throughput.py --size 1b --bf16      # one GPU: the issue's 1.1B Llama
    python benchmarks/throughput.py --size 1b --bf16 --method lora
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parents[1] / "sala_train" / "assets"
TOKENIZER = ASSETS / "models" / "tiny-chat"
# Llama-architecture shapes (hidden, layers, heads, kv heads, intermediate, vocab).
SIZES = {
    "tiny": (64, 2, 4, 2, 176, 1024),
    "125m": (768, 12, 12, 12, 2048, 32000),
    "350m": (1024, 24, 16, 16, 2816, 32000),
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
}
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "was", "with", "as", "by",
         "at", "from", "this", "be", "or", "are", "an", "we", "can", "not"]  # fmt: skip


def model_dir(size: str, out: Path) -> Path:
    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    target = out / f"llama-{size}"
    shutil.copytree(TOKENIZER, target, dirs_exist_ok=True)
    config = json.loads((TOKENIZER / "config.json").read_text())
    config |= {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
               "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": max(vocab, config["vocab_size"]),
               "max_position_embeddings": 4096, "tie_word_embeddings": False}  # fmt: skip
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def synthetic_chats(path: Path, count: int, max_words: int, seed: int) -> None:
    """Chats whose lengths follow a log-normal (a long right tail; see the module's doc)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(count):
            words = min(max_words, max(8, int(math.exp(rng.gauss(math.log(155), 0.8)))))
            prompt = " ".join(rng.choice(WORDS) for _ in range(max(words // 4, 2)))
            reply = " ".join(rng.choice(WORDS) for _ in range(words - words // 4))
            record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
            fh.write(json.dumps(record) + "\n")


class Meter:
    """Real tokens and wall time between the end of warm-up and the last step. The GPU is waited
    for at those two steps only: the steps between run as in training, with the CPU queueing
    ahead (a wait at every step would add the idle time the runner avoids)."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        meter = self

        class Callback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step not in (warmup, state.max_steps):
                    return
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                # (the runner reads its token count back only where it is shown: ask for it)
                reading = (time.perf_counter(), meter.trainer.tokens_seen())
                if state.global_step == warmup:
                    meter.start = reading
                if state.global_step == state.max_steps:
                    meter.end = reading

        self.callback = Callback()
        self.trainer: Any = None
        self.start: tuple[float, int] = (0.0, 0)
        self.end: tuple[float, int] = (0.0, 0)

    def tokens(self) -> int:
        return self.end[1] - self.start[1]

    def tokens_per_second(self) -> float:
        return self.tokens() / max(self.end[0] - self.start[0], 1e-9)


def run_layout(layout: str, args: argparse.Namespace, model_path: Path, data: Path, work: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_module

    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig
    from sala_train.data.collators import PadToLongestCollator
    from sala_train.errors import DistributedSetupError
    from sala_train.launch.plan import resolve_processes
    from sala_train.runner import prepare

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if args.bf16 else "float32"
    overrides = [
        f"model.name_or_path={model_path}",
        "model.from_scratch=true",
        f"model.dtype={dtype}",
        f"method={args.method}",
        "dataset=messages",
        f"dataset.train=[{data}]",
        f"dataset.validation=[{data}]",
        f"dataset.cutoff_len={args.max_length}",
        f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.samples_per_step if layout == 'packed' else args.micro_batch}",
        f"train.gradient_accumulation_steps={1 if layout == 'packed' else args.samples_per_step // args.micro_batch}",
        "train.eval_steps=1000000",
        "train.save_steps=1000000",
        "train.logging_steps=1000000",
        "train.eval_on_start=false",
        f"train.bf16={str(args.bf16).lower()}",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"train.packing={str(layout == 'packed').lower()}",
        "train.warmup_steps=0",
    ]
    if layout == "packed" and cuda:
        overrides.append("model.attn_implementation=sala_varlen")
    if layout == "guide":  # (finetune.py computes the whole logits and loss in PyTorch)
        overrides.append("model.liger=false")
    if args.method == "lora":
        overrides.append("method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose(config_name="train", overrides=overrides)
    cfg = resolve_processes(resolve_config(composed, RunConfig, Path.cwd()), 0)
    meter = Meter(warmup=args.warmup)
    run_dir = work / layout
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare(cfg, run_dir, [meter.callback])
    except DistributedSetupError as exc:  # the packing check refused: the other layouts still run
        return {"layout": layout, "liger": False, "params": None} | unmeasured(str(exc))
    trainer = meter.trainer = prepared.trainer
    # Training speed only: no evaluation, and no checkpoint at the last step (GBs for the 1.1B).
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    trainer.args.eval_strategy, trainer.args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
    if layout == "guide":  # finetune.py pads every sample to model_max_length
        pad = prepared.tokenizer.pad_token_id
        trainer.data_collator = PadToLongestCollator(pad_token_id=pad, pad_to_multiple_of=args.max_length)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = trainer.model
    result: dict[str, Any] = {"layout": layout, "liger": bool(trainer.args.use_liger_kernel),
                              "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError:
        result |= unmeasured("out of GPU memory")
        trainer.optimizer = None  # (its states, partly allocated, go with the model below)
    else:
        if meter.end == (0.0, 0):  # (stopped early: a diverged loss, a stop request)
            result |= unmeasured(f"stopped at step {trainer.state.global_step} of {args.steps}")
        else:
            result |= {"tokens_per_s": meter.tokens_per_second(), "tokens": meter.tokens(),
                       "tokens_total": trainer.state.num_input_tokens_seen,
                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       # (what decides an out-of-memory: packed rows of changing length fragment the cache)
                       "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}  # fmt: skip
            flops = flops_per_token(model)
            result["mfu"] = flops * result["tokens_per_s"] / (args.peak_tflops * 1e12) if args.peak_tflops else None
    del prepared, trainer, model
    gc.collect()  # accelerate's wrapped forward keeps the model in a reference cycle
    if cuda:
        torch.cuda.empty_cache()
    return result


def unmeasured(error: str) -> dict[str, Any]:
    """A layout's figures when it could not be measured, and why."""
    return {"error": error, "tokens_per_s": None, "mfu": None, "peak_gib": None}


def flops_per_token(model: Any) -> float:
    """Training FLOPs per token of the non-embedding weights' matrix products: forward 2, input
    gradients 2, weight gradients 2 per trained weight. Attention's scores and weighted sums are
    left out (about 2.4% more for the 1b shape at these lengths): MFU reads that much low."""
    embedding = model.get_input_embeddings().weight
    dense = sum(p.numel() for p in model.parameters() if p is not embedding)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not embedding)
    return 4 * dense + 2 * trained


def report(results: list[dict[str, Any]]) -> str:
    guide = next((r["tokens_per_s"] for r in results if r["layout"] == "guide"), None)
    lines = [f"{'layout':<8} {'real tokens/s':>14} {'vs guide':>9} {'MFU':>7} {'peak GiB':>9} {'Liger':>6}"]
    for r in results:
        if r["tokens_per_s"] is None:
            lines.append(f"{r['layout']:<8} {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / guide:.1f}x" if guide else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        liger = "on" if r["liger"] else "off"
        lines.append(f"{r['layout']:<8} {r['tokens_per_s']:>14,.0f} {ratio:>9} {mfu:>7} {peak:>9} {liger:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from sala_train.distributed import one_gpu_for_one_process

    one_gpu_for_one_process()  # (one GPU is measured; before CUDA starts: DataParallel spread it over all)
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b" if cuda else "tiny")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--layouts", default="guide,padded,packed")
    parser.add_argument("--steps", type=int, default=30 if cuda else 12)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--samples-per-step", type=int, default=32 if cuda else 16)
    parser.add_argument("--micro-batch", type=int, default=4,
                        help="samples per pass of the guide and padded layouts (accumulated to a step)")  # fmt: skip
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--bf16", action="store_true", default=cuda)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0 if cuda else 0.0,
                        help="the GPU's dense bf16 peak (H100/H200 SXM: 989); 0 disables MFU")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.samples_per_step % args.micro_batch:
        parser.error("--samples-per-step must be a multiple of --micro-batch")
    if not 1 <= args.warmup < args.steps:  # (the meter starts at the end of the warm-up's last step)
        parser.error("--warmup must be at least 1 and less than --steps")
    layouts = args.layouts.split(",")
    if "guide" in layouts and layouts[0] != "guide":
        parser.error("--layouts: guide comes first (Liger, which it runs without, patches transformers' Llama "
                     "modules for the rest of the process)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sala-bench-") as tmp:
        work = Path(tmp)
        model_path = model_dir(args.size, work)
        data = work / "chats.jsonl"
        synthetic_chats(data, args.samples_per_step * (args.steps + 2), max_words=args.max_length // 2, seed=0)
        results: list[dict[str, Any]] = []
        for layout in layouts:
            results.append(run_layout(layout, args, model_path, data, work))
            print(f"benchmark: {json.dumps(results[-1])}", flush=True)  # (each layout as it ends)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    params = next((r["params"] for r in results if r["params"]), 0)
    print(f"\nmodel {args.size} ({params / 1e6:.1f}M parameters), method {args.method}, "
          f"{args.samples_per_step} samples/step (guide and padded: {args.micro_batch} per pass, accumulated), "
          f"{'cuda' if cuda else 'cpu'}")  # fmt: skip
    if total := next((r["tokens_total"] for r in results if r.get("tokens_total")), 0):
        # (the guide's ratio owes most to this: its passes are this many times the real tokens)
        mean = total / (args.samples_per_step * args.steps)
        print(
            f"samples of {mean:.0f} real tokens on average; the guide pads each to {args.max_length} "
            f"({args.max_length / mean:.1f}x)"
        )
    print(report(results))


if __name__ == "__main__":
    main()
