"""The base checkpoint's checksums, verified in the background while the model is built."""

from __future__ import annotations

import torch.distributed as dist

from ..errors import CheckpointError


class BaseVerification:
    """Each rank verifies the checksums of its share of the base checkpoint's files in a
    thread (sha256 releases the GIL) while the model is built and the adapters initialised;
    ``result()`` gathers the verdicts and raises on every rank if any file changed."""

    def __init__(self, base, rank: int, world: int, host_group=None):
        import threading

        self.group = host_group
        self.verdict = None
        self.thread = None
        if hasattr(base, "check_share"):  # not for the benchmarks' random base
            self.thread = threading.Thread(target=lambda: setattr(self, "verdict", base.check_share(rank, world)),
                                           daemon=True)
            self.thread.start()

    def result(self) -> None:
        if self.thread is None:
            return
        self.thread.join()
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, self.verdict, group=self.group)
        bad = [v for v in verdicts if v]
        if bad:
            raise CheckpointError(f"{bad[0]}: the base checkpoint is damaged; convert it again")
