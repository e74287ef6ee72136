#!/usr/bin/env bash
# Wheels for the borrowed GPU machine (scripts/gpu_checks.py), which has NO network: it cannot pip
# install anything, so every package sala-train needs there and its image lacks travels in .whl/
# (git-ignored through .git/info/exclude; the device call must name it in `carry`).
#
# The image already holds torch 2.11.0+cu130, transformers 5.17.0, accelerate 1.15.0, peft,
# tokenizers, huggingface_hub 1.33.0, numpy, pyarrow, pandas, pyyaml, ... (the device notes' list
# "Python packages already there"); those are NOT carried. Versions below are pinned to what the
# development venv runs. Binary wheels are fetched for CPython 3.12 manylinux x86-64 (the device's
# python3 is 3.12.3); the two source-only packages are built here: antlr4-python3-runtime, and
# DeepSpeed with DS_BUILD_OPS=0 (pure Python, py3-none-any; it JIT-builds any op it needs on the
# device, so the torch version recorded at build time is never compared at runtime).
#
# Run from the repo root, with network, in a Python env that has pip, setuptools (and torch, which
# DeepSpeed's setup.py imports if present):
#     bash scripts/gpu_wheels.sh            # (re)creates .whl/ exactly, idempotent
# On the device, every command starts with this prelude:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
# and, once, to check the carried wheels' and pyproject's requirements against the image (offline):
#     bash scripts/gpu_wheels.sh --check /tmp/site
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

# Needed by the GPU checks' paths (CLI, single/fsdp/zero3, full/LoRA, sft, logger=none, throughput).
CORE=(
    hydra-core==1.3.8 omegaconf==2.3.1                       # + antlr4-python3-runtime (built)
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5      # + deepspeed (built)
    annotated-types==0.8.0 typing-inspection==0.4.5
    liger-kernel==0.8.5                                      # model.liger=auto on CUDA (benchmark)
)
# pyproject's Hydra plugins. Hydra scans hydra_plugins.* on every run, and this repo's
# hydra_plugins/sala_train_optuna imports hydra_optuna_sweeper (a warning on every run without it);
# optuna/submitit and their dependencies are what those two require (hparams_search, submitit sweeps).
SWEEP=(
    hydra-optuna-sweeper==1.3.0 optuna==2.10.1 alembic==1.13.3 sqlalchemy==1.4.54 greenlet==3.5.6 mako==1.4.3
    cliff==4.17.0 autopage==0.6.0 cmd2==4.3.1 prompt-toolkit==3.0.53 pyperclip==1.11.0
    rich-argparse==1.8.0 prettytable==3.18.0 wcwidth==0.9.4 stevedore==5.10.0 cmaes==0.13.1
    colorlog==6.12.0
    hydra-submitit-launcher==1.2.0 submitit==1.5.4
)
BUILT=(antlr4-python3-runtime==4.9.3 deepspeed==0.19.8)

check() {  # on the device: carried wheels' and sala-train's own requirements, against target + image
    local site=${1:?usage: gpu_wheels.sh --check SITE_DIR}
    PYTHONPATH="$site" python3 - "$site" pyproject.toml <<'PY'
import sys, tomllib, importlib.metadata as md
from pathlib import Path
from packaging.requirements import Requirement
site, pyproject = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
NOT_CARRIED = {"trl"}  # dpo/kto stages only; the GPU checks run sft
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
def unmet(owner, raws):
    bad = 0
    for raw in raws:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = version(req.name)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            expected = owner == "sala-train" and req.name in NOT_CARRIED
            print(f"{'(expected) ' if expected else ''}UNMET {owner}: {req} (have {have})")
            bad += not expected
    return bad
bad = sum(unmet(f"{d.metadata['Name']} {d.version}", d.requires or []) for d in md.distributions(path=[str(site)]))
bad += unmet("sala-train", tomllib.loads(pyproject.read_text())["project"]["dependencies"])
print("image:", ", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "peft", "accelerate", "tokenizers",
      "huggingface-hub", "typing-extensions", "fsspec", "pyarrow", "rich", "triton")))
print("requirements:", "all met" if not bad else f"{bad} unmet")
sys.exit(1 if bad else 0)
PY
}

if [[ ${1:-} == --check ]]; then
    check "${2:-/tmp/site}"
    exit
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${CORE[@]}" "${SWEEP[@]}"
# DS_BUILD_OPS=0: no compiled ops, so a pure-Python wheel whose ops JIT-build on the device.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$tmp" "${BUILT[@]}"

# Every wheel's tags must match the device's CPython 3.12 on manylinux_2_28 x86-64 (or older glibc).
"$PYTHON" - "$tmp"/*.whl <<'PY'
import sys
from pathlib import Path
from packaging import tags
from packaging.utils import parse_wheel_filename
plats = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
ok = set(tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=plats))
ok |= set(tags.compatible_tags((3, 12), "cp312", plats))
bad = [Path(w).name for w in sys.argv[1:] if not parse_wheel_filename(Path(w).name)[3] & ok]
if bad:
    sys.exit("gpu_wheels.sh: not installable on cp312 x86-64: " + " ".join(bad))
PY
expected=$(( ${#CORE[@]} + ${#SWEEP[@]} + ${#BUILT[@]} ))
got=$(ls "$tmp"/*.whl | wc -l)
[[ $got -eq $expected ]] || { echo "gpu_wheels.sh: $got wheels, expected $expected" >&2; exit 1; }

rm -rf .whl
mkdir .whl
mv "$tmp"/*.whl .whl/
du -sh .whl
