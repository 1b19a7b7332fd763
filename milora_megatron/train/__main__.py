"""``torchrun --nproc_per_node N -m milora_megatron.train --config FILE.yaml [key=value ...]``"""

import sys

from .cli import main

sys.exit(main())
