#!/usr/bin/env python
"""Forgetting and task evaluation of a fine-tuned model against its ORIGINAL base, through

The installed command ``milora-forgetting`` is the same program (``milora-forgetting --help``); this path stays for
scripts that call it."""

import sys

from milora_megatron.cli.forgetting import main

if __name__ == "__main__":
    sys.exit(main())
