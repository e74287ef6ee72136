"""What ``launcher.dry_run=true`` prints: the exact commands (per node), files, memory estimate."""

from __future__ import annotations

from pathlib import Path

from sala_train.config.io import CONFIG_FILE
from sala_train.config.schema import LauncherConfig, MultinodeLauncher, RunConfig, SlurmLauncher
from sala_train.launch.plan import LaunchPlan, nnodes, world_size
from sala_train.memory import Capacity, ParameterCounts, report, visible_cpu_memory_gib, visible_gpu_memory_gib


def render(
    run: RunConfig, plans: list[LaunchPlan], run_dir: Path, counts: ParameterCounts | str, gpus_counted_here: int | None
) -> str:
    """The dry run's output; ``counts``: ``memory.counts_or_why_not(run)``, taken before the run's
    records were written (a problem it finds stops the dry run); ``gpus_counted_here``: the GPUs of
    this machine that ``launcher.nproc_per_node=null`` was resolved from (None: it was set)."""
    lines: list[str] = []
    if isinstance(run.launcher, MultinodeLauncher):
        # The printed commands start runners, which read the config this dry run wrote here.
        lines.append(
            f"# every node reads {run_dir}/{CONFIG_FILE}: keep it on a file system the nodes share, or copy "
            f"{run_dir} to the same path on each node before pasting"
        )
        if gpus_counted_here == 0:
            # (a login node without GPUs: pasted on 8-GPU nodes, the commands started one process each)
            lines.append(
                f"# WARNING: launcher.nproc_per_node=null is counted from this machine's GPUs, and it has none: these "
                f"commands start {run.launcher.nproc_per_node} process per node; for GPU nodes set "
                "launcher.nproc_per_node=<GPUs per node> and dry-run again, or run the sala-train command itself on "
                "each node (it counts that node's GPUs)"
            )
    for plan in plans:
        if len(plans) > 1 or plan.files:
            lines.append(f"# {plan.label}")
        lines.append(plan.display())
        for name, text in plan.files.items():
            lines += [f"# {name}:", text.rstrip("\n")]
    lines += report(run, counts, world_size(run), nnodes(run.launcher), capacity(run.launcher))
    return "\n".join(lines)


def capacity(launcher: LauncherConfig) -> Capacity:
    """The memory the job will have: as configured, else this machine's, except under SLURM, whose
    compute nodes are not this machine (their CPU memory is what ``launcher.mem`` asks for)."""
    if not isinstance(launcher, SlurmLauncher):
        return Capacity(
            launcher.gpu_memory_gib or visible_gpu_memory_gib(),
            launcher.cpu_memory_gib or visible_cpu_memory_gib(),
        )
    asked = "launcher.mem=0 asks for all of a node's memory, an amount not known here; set" if launcher.mem else "set"
    return Capacity(
        launcher.gpu_memory_gib,
        launcher.cpu_memory_gib or slurm_mem_gib(launcher.mem),
        gpu_unknown="# memory: the compute nodes' GPUs are not visible from here; set launcher.gpu_memory_gib "
        "to check the fit",
        cpu_unknown=f"# memory: the compute nodes' CPU memory is unknown; {asked} launcher.cpu_memory_gib "
        + ("" if launcher.mem else "(or launcher.mem, what the job asks for) ")
        + "to check the offload",
    )


_UNITS = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}


def slurm_mem_gib(mem: str | None) -> float | None:
    """GiB of sbatch ``--mem`` (validated: a number, megabytes unless K, M, G or T follows, then an
    optional B); 0 asks for all of a node's memory, an amount not known here."""
    if not mem:
        return None
    unit = mem.upper().removesuffix("B")
    number = unit.rstrip("KMGT")
    return int(number) * _UNITS[unit[len(number) :] or "M"] or None
