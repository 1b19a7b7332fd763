#!/usr/bin/env python
"""Spectrum and subspace analysis of a fine-tune against its ORIGINAL base, per layer and target

The installed command ``milora-spectrum`` is the same program (``milora-spectrum --help``); this path stays for
scripts that call it."""

import sys

from milora_megatron.cli.spectrum import main

if __name__ == "__main__":
    sys.exit(main())
