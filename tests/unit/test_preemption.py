"""Stop requests: every rank stops at the same step, whichever rank saw the request."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def _rank(rank: int, run_dir: str, init_file: str) -> None:
    import torch.distributed as dist
    from transformers import TrainerControl

    from sala_train.launch.plan import PREEMPT_REQUEST
    from sala_train.preemption import PreemptionCallback

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    callback = PreemptionCallback(Path(run_dir))
    looked: list[str] = []
    real_exists = Path.exists
    Path.exists = lambda self: looked.append(self.name) or real_exists(self)  # type: ignore[method-assign]
    args = SimpleNamespace(device="cpu", local_process_index=rank, logging_strategy="steps")
    stops = []
    for step in range(3):
        if step == 1 and rank == 0:
            (Path(run_dir) / PREEMPT_REQUEST).touch()
        dist.barrier()
        control = TrainerControl()
        callback.on_step_end(args, None, control)
        stops.append(control.should_training_stop)
    Path(run_dir, f"{rank}.json").write_text(json.dumps([stops, looked.count(PREEMPT_REQUEST)]))
    dist.destroy_process_group()


def test_one_rank_per_node_looks_for_the_request_file_and_all_stop_together(tmp_path):
    """The request file (SLURM's batch script writes it) is looked for by each node's first rank
    only, a stat per step that every GPU made on a shared file system; the all-reduce stops the
    others at the same step."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(tmp_path), str(tmp_path / "init")), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert seen == [[[False, True, True], 3], [[False, True, True], 0]]
