"""Which process speaks for the run, known before torch.distributed is initialised.

The runner's checks (packing, preflight, the loss note) run before the Trainer builds the process
group, so ``torch.distributed.get_rank`` cannot answer yet; torchrun's ``RANK`` can, and a single
process has none.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of the job (or the only process): the one that prints the run's messages."""
    return int(os.environ.get("RANK", "0")) == 0
