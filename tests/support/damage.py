"""Damage a file the way a bad disk or a stray write does, for the fault tests."""

import os


def flip(path, count=2000):
    """Invert ``count`` bytes in the middle of ``path``, keeping its size."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(count)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in block))
