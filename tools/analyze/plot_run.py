#!/usr/bin/env python
"""Draw one or more training runs into one PNG (loss, validation, forgetting, lr, tokens/s).

The installed command ``milora-plot-run`` is the same program (``milora-plot-run --help``)."""

import sys

from milora_megatron.cli.plot_run import main

if __name__ == "__main__":
    sys.exit(main())
