"""The GPU checks of the distributed (3) and throughput (6) issues, as one prepared script.

On one GPU: ``fsdp`` and ``zero3`` with a ~100M-parameter random-init Llama, full and LoRA, each
trained a few steps through the real CLI, its ``final/`` reloaded with plain transformers/peft
and compared with the weights training ended with (the eval loss it logged); the varlen-kernel
test; then the throughput benchmark (1.1B Llama, full and LoRA). Results go to ``$OUT`` (or
./gpu-checks) as JSON and text. ``--cpu-dry-run`` exercises the same steps on CPU where they can
run (zero3 only, tiny model), to check the script before spending device time.

    python scripts/gpu_checks.py                 # on the GPU machine
    python scripts/gpu_checks.py --cpu-dry-run   # here, first
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from throughput import model_dir  # noqa: E402


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    start = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return proc.returncode, time.monotonic() - start


def reload_eval_loss(run_dir: Path, method: str) -> float:
    """Eval loss of final/ loaded with plain transformers (and peft), on the run's validation data."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from sala_train.config import io
    from sala_train.config.schema import RunConfig
    from sala_train.data.build import build_data
    from sala_train.data.collators import PadToLongestCollator
    from sala_train.models import load_tokenizer

    cfg = io.load(RunConfig, run_dir)
    final = run_dir / "final"
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    else:
        from peft import PeftModel

        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        torch.manual_seed(raw["train"]["seed"])
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
        model = PeftModel.from_pretrained(base, str(final))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    tokenizer = load_tokenizer(cfg.model)
    rows = list(build_data(cfg.stage, cfg.dataset, tokenizer).splits["validation"])[:16]
    batch = PadToLongestCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        return float(model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "gpu-checks")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.cpu_dry_run else "125m"
    model = model_dir(size, out)
    scripts = Path(sys.executable).parent
    results: dict[str, object] = {}
    backends = ["zero3"] if args.cpu_dry_run else ["fsdp", "zero3"]
    for backend in backends:
        for method in ("full", "lora"):
            name = f"{backend}-{method}"
            cmd = [str(scripts / "sala-train"), "model=hf", f"model.name_or_path={model}", "model.from_scratch=true",
                   f"backend={backend}", "launcher.nproc_per_node=1", f"method={method}", f"hydra.run.dir={name}",
                   "train.max_steps=20", "train.eval_steps=20", "train.save_steps=10", "train.logging_steps=5",
                   f"train.bf16={'false' if args.cpu_dry_run else 'true'}", "dataset.cutoff_len=512",
                   "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
                   if method == "lora" else "train.learning_rate=1e-4"]  # fmt: skip
            code, seconds = run(cmd, out / f"{name}.log", timeout=900)
            entry: dict[str, object] = {"exit": code, "seconds": round(seconds, 1)}
            run_dir = out / name
            if code == 0:
                logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                entry["logged_eval_loss"] = [r["eval_loss"] for r in logged if r.get("event") == "eval"][-1]
                entry["reloaded_eval_loss"] = reload_eval_loss(run_dir, method)
            results[name] = entry
            print(name, entry, flush=True)
    if not args.cpu_dry_run:
        code, _ = run([sys.executable, "-m", "pytest", "-q", str(REPO / "tests/unit/test_packing.py")],
                      out / "varlen-test.log", timeout=600)  # fmt: skip
        results["varlen_test_exit"] = code
        for method in ("full", "lora"):
            bench = out / f"throughput-{method}.json"
            code, _ = run([sys.executable, str(REPO / "benchmarks/throughput.py"), "--size", "1b", "--method", method,
                           "--json", str(bench)], out / f"throughput-{method}.log", timeout=900)  # fmt: skip
            results[f"throughput_{method}"] = json.loads(bench.read_text()) if code == 0 else {"exit": code}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
