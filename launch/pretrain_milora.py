#!/usr/bin/env python
"""Fine-tune a converted checkpoint with MiLoRA / PiSSA / LoRA / MiCA on megatron-core.

    torchrun --nproc_per_node N launch/pretrain_milora.py --config configs/FILE.yaml [key=value ...]

The same program as ``torchrun ... -m milora_megatron.train`` (``--help`` lists every config
key); this path stays for scripts that call it."""

import sys

from milora_megatron.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
