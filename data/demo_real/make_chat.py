#!/usr/bin/env python
"""Writes chat_train.jsonl: short conversations whose assistant turns all answer in one fixed,
terse style ("Short answer: ..."), so a few minutes of fine-tuning visibly change how the
model answers held-out questions. Written for this project (CC0); deterministic."""

import json
import os
import random

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Chile", "Santiago"), ("Cuba", "Havana")]
FACTS = [("How many days are in a week?", "7"), ("How many legs does a cat have?", "4"),
         ("What is the freezing point of water in Celsius?", "0 degrees"),
         ("What gas do plants take in from the air?", "carbon dioxide"), ("How many hours are in a day?", "24"),
         ("What is the largest planet in the solar system?", "Jupiter"), ("How many months are in a year?", "12"),
         ("What is the opposite of hot?", "cold"), ("Which animal is known as the king of the jungle?", "the lion"),
         ("What do bees make?", "honey"), ("How many sides does a triangle have?", "3"),
         ("What is the boiling point of water in Celsius?", "100 degrees")]


def main() -> None:
    rng = random.Random(0)
    convs = []
    for country, city in CAPITALS:
        convs.append([("user", f"What is the capital of {country}?"), ("assistant", f"Short answer: {city}.")])
    for q, a in FACTS:
        convs.append([("user", q), ("assistant", f"Short answer: {a}.")])
    for _ in range(16):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        convs.append([("user", f"What is {a} plus {b}?"), ("assistant", f"Short answer: {a + b}.")])
    # multi-turn: both assistant turns carry the style (and both are trained on)
    for _ in range(12):
        (c1, k1), (c2, k2) = rng.sample(CAPITALS, 2)
        convs.append([("user", f"What is the capital of {c1}?"), ("assistant", f"Short answer: {k1}."),
                      ("user", f"And of {c2}?"), ("assistant", f"Short answer: {k2}.")])
    rng.shuffle(convs)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_train.jsonl")
    with open(out, "w") as f:
        for turns in convs:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    print(f"wrote {len(convs)} conversations to {out}")


if __name__ == "__main__":
    main()
