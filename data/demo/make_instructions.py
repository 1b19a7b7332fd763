#!/usr/bin/env python
"""Writes instructions.jsonl / valid.jsonl / general.txt next to this file: small instruction
data generated from templates (arithmetic, counting, word reversal, unit conversion).
Generated here, no third-party text: public domain (CC0). Deterministic (seeded)."""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["river", "garden", "window", "pencil", "orange", "planet", "silver", "bridge", "candle", "forest",
         "harbor", "meadow", "rocket", "violin", "wizard", "yellow", "basket", "castle", "dragon", "island"]


def record(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return {"instruction": "Subtract the second number from the first.", "input": f"{hi} and {lo}",
                "output": f"{hi} minus {lo} is {hi - lo}."}
    if kind == 2:
        w = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
    if kind == 3:
        w = rng.choice(WORDS)
        return {"instruction": f"How many letters are in the word {w}?", "input": "", "output": f"{w} has {len(w)} letters."}
    return {"instruction": f"Convert {a} meters to centimeters.", "input": "", "output": f"{a} meters is {a * 100} centimeters."}


def general_text(rng: random.Random, sentences: int) -> str:
    subjects = ["The old bridge", "A quiet river", "The small garden", "Every morning the baker", "The tall castle"]
    verbs = ["stands near", "runs past", "looks over", "waits beside", "shines above"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} the {rng.choice(WORDS)}." for _ in range(sentences))


def main() -> None:
    rng = random.Random(2024)
    for name, n in (("instructions.jsonl", 160), ("valid.jsonl", 24)):
        with open(os.path.join(HERE, name), "w") as f:
            for _ in range(n):
                f.write(json.dumps(record(rng)) + "\n")
    with open(os.path.join(HERE, "general.txt"), "w") as f:
        f.write(general_text(rng, 200) + "\n")


if __name__ == "__main__":
    main()
