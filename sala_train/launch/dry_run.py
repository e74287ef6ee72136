"""What ``launcher.dry_run=true`` prints: the exact commands (per node), files, memory estimate."""

from __future__ import annotations

from sala_train.config.schema import RunConfig
from sala_train.launch.plan import LaunchPlan, nnodes, world_size


def render(run: RunConfig, plans: list[LaunchPlan]) -> str:
    from sala_train.memory import report, visible_gpu_memory_gib

    lines: list[str] = []
    for plan in plans:
        if len(plans) > 1 or plan.files:
            lines.append(f"# {plan.label}")
        lines.append(plan.display())
        for name, text in plan.files.items():
            lines += [f"# {name}:", text.rstrip("\n")]
    gpu_gib = run.launcher.gpu_memory_gib or visible_gpu_memory_gib()
    lines += report(run, world_size(run), nnodes(run.launcher), gpu_gib)
    return "\n".join(lines)
