"""Paper-fidelity analysis of a fine-tune against its base, on Hugging Face folders:

- ``spectrum``: float64 matrix math (amplification factor, subspace similarity, init spectrum);
- ``deltas``: dW per (layer, target) from a PEFT adapter or a merged folder, and the report;
- ``forgetting``: forgetting loss, perplexity, task loss and exact match through transformers;
- ``plots``: PNG figures of a spectrum report (imports matplotlib, so not imported here).
"""

from .deltas import parse_layers, spectrum_report
from .forgetting import evaluate, exact_match, final_number, load_pair
from .spectrum import (amplification, analyze_pair, init_side, init_singular_values, similarity_to_w,
                       subspace_similarity)

__all__ = ["amplification", "analyze_pair", "evaluate", "exact_match", "final_number", "init_side",
           "init_singular_values", "load_pair", "parse_layers", "similarity_to_w", "spectrum_report",
           "subspace_similarity"]
