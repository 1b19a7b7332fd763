"""The command-line tools (installed as ``milora-*`` commands; ``tools/`` keeps script paths to them)."""
