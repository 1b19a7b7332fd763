"""A small CPU replication of the MiLoRA paper's claims: replicate.py runs it, results/RESULTS.md
holds the latest table (see docs/analysis.md)."""
