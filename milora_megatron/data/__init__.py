"""Data shared by training and analysis: prompt templates and the readers of data files."""

from .records import load_records, text_samples, to_samples, tokenize_examples
from .templates import PREAMBLE, PREAMBLE_INPUT, TEMPLATES, Template, instruction_prompt

__all__ = ["PREAMBLE", "PREAMBLE_INPUT", "TEMPLATES", "Template", "instruction_prompt", "load_records",
           "text_samples", "to_samples", "tokenize_examples"]
