"""What a padded batch's shape costs: exact widths against ``train.pad_to_multiple_of``'s rounding.

On an H100 a 1.1B Llama's forward and backward pass of 4 padded rows took 245 ms on a width met
for the first time and 78.5 ms on one met before (2026-12-05): something in the sdpa path builds a
plan per shape, most likely cuDNN's attention graph. This measures, in one process, passes of
``--rows`` samples with log-normal lengths (as ``throughput.py``'s chats), batched by sala-train's
own ``PadToLongestCollator``:

- ``exact, new widths``: each pass padded to its longest sample, lengths drawn afresh (a run's
  first passes: nearly every width is new);
- ``exact, widths met``: the same lengths again (a long run's steady state);
- ``rounded to N, new lengths``: lengths drawn afresh, widths rounded up to ``--multiple``;
- on CUDA also ``exact, new widths, cuDNN sdpa off`` and ``exact, new widths, efficient sdpa only``
  (which of sdpa's kernels pays per shape).

Prints the median milliseconds per pass, real tokens per second and each row's ratio to the first.

    python benchmarks/batch_shapes.py                 # CPU: a tiny model, a smoke check (~10 s)
    python benchmarks/batch_shapes.py --size 1b       # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (sala_train, run from a checkout)

from throughput import SIZES

from sala_train.data.collators import PadToLongestCollator


def lengths_drawn(passes: int, rows: int, seed: int, longest: int) -> list[list[int]]:
    """Sample lengths of a log-normal with a long right tail (median ~240 tokens), ``rows`` per pass."""
    rng = random.Random(seed)
    return [[max(16, min(longest, int(math.exp(rng.gauss(math.log(240), 0.8))))) for _ in range(rows)]
            for _ in range(passes)]  # fmt: skip


def model_of(size: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def timed_passes(model: Any, batches: list[dict[str, torch.Tensor]], device: str) -> list[float]:
    """Seconds of each forward and backward pass (the GPU waited for at each: a pass is the unit)."""
    times = []
    for batch in batches:
        moved = {k: v.to(device) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**moved, use_cache=False).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return times


def scenario(name: str, model: Any, passes: list[list[int]], multiple: int | None, device: str,
             vocab: int, backends: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(1)
    collate = PadToLongestCollator(0, pad_to_multiple_of=multiple)
    batches = [collate([{"input_ids": [rng.randrange(3, vocab) for _ in range(n)], "labels": [1] * n} for n in p])
               for p in passes]  # fmt: skip
    with backends():
        times = timed_passes(model, batches, device)
    widths = [b["input_ids"].shape[1] for b in batches]
    return {"scenario": name, "median_ms": 1000 * statistics.median(times),
            "tokens_per_s": sum(map(sum, passes)) / sum(times), "distinct_widths": len(set(widths)),
            "passes": len(passes)}  # fmt: skip


def only(*kernels: Any) -> Callable[[], Iterator[None]]:
    from torch.nn.attention import sdpa_kernel

    return lambda: sdpa_kernel(list(kernels))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b" if cuda else "tiny")
    # (more passes than rounded widths: each width is new once, then met; exact widths stay mostly new)
    parser.add_argument("--passes", type=int, default=48 if cuda else 6)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    model = model_of(args.size, device, torch.bfloat16 if cuda else torch.float32)
    vocab = model.config.vocab_size
    warm = lengths_drawn(4, args.rows, seed=99, longest=args.max_length)
    timed_passes(
        model, [PadToLongestCollator(0)([{"input_ids": [5] * n, "labels": [1] * n} for n in p]) for p in warm], device
    )  # fmt: skip  (kernels loaded, allocator warm)
    fresh = lengths_drawn(args.passes, args.rows, seed=0, longest=args.max_length)
    runs = [scenario("exact, new widths", model, fresh, None, device, vocab),
            scenario("exact, widths met", model, fresh, None, device, vocab),
            scenario(f"rounded to {args.multiple}, new lengths", model,
                     lengths_drawn(args.passes, args.rows, seed=1, longest=args.max_length), args.multiple, device,
                     vocab)]  # fmt: skip
    if cuda:
        from torch.nn.attention import SDPBackend

        runs.append(scenario("exact, new widths, cuDNN sdpa off", model,
                             lengths_drawn(args.passes, args.rows, seed=2, longest=args.max_length), None, device,
                             vocab, only(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)))  # fmt: skip
        runs.append(scenario("exact, new widths, efficient sdpa only", model,
                             lengths_drawn(args.passes, args.rows, seed=3, longest=args.max_length), None, device,
                             vocab, only(SDPBackend.EFFICIENT_ATTENTION)))  # fmt: skip
    base = runs[0]["tokens_per_s"]
    print(f"model {args.size}, {args.rows} rows per pass, {args.passes} passes each, {device}")
    print(f"{'scenario':<42} {'ms/pass':>9} {'tokens/s':>10} {'vs first':>9} {'widths':>7}")
    for r in runs:
        r["ratio"] = r["tokens_per_s"] / base
        print(f"{r['scenario']:<42} {r['median_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} {r['ratio']:>8.1f}x "
              f"{r['distinct_widths']:>7}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return runs


if __name__ == "__main__":
    main()
