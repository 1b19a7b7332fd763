#!/usr/bin/env python
"""torchrun that leaves SIGUSR1 to its workers.

Slurm's ``--signal=USR1@120`` signals every process of the job step: the torchrun launcher
and the trainer workers alike. torchrun has no USR1 handler, so the default action would kill
the launcher (and with it the workers, mid-checkpoint). Here the launcher ignores USR1; the
workers install their own handler (save a checkpoint, exit 0) and torchrun then exits 0.
An ignored disposition is inherited across exec, so a worker signalled before it installed
its handler keeps running instead of dying. Arguments are exactly torchrun's.
"""

import signal
import sys

from torch.distributed.run import main

if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.exit(main())
