"""The fine-tuning task: templated arithmetic word problems with one checkable number.

Far from the pre-training text (docstrings), so learning it and keeping the pre-trained
distribution pull in different directions, which is what the forgetting claim is about.
Records use the ``metamath`` template (query/response); the response ends "The answer is N".
"""

from __future__ import annotations

import json
import random

NAMES = ["Anna", "Ben", "Carla", "Dev", "Ema", "Farid", "Gina", "Hugo", "Iris", "Jon", "Kemal", "Lena", "Mia",
         "Nils", "Omar", "Pia"]
THINGS = ["apples", "pens", "books", "coins", "stamps", "shells", "cards", "marbles", "cups", "stones"]
ADD = [
    "{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?",
    "There are {a} {t} in a box and {b} {t} on the table. How many {t} are there in all?",
    "{n} found {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} find?",
]
SUB = [
    "{n} has {a} {t} and gives away {b}. How many {t} are left?",
    "A shelf holds {a} {t}. {b} {t} are taken. How many {t} remain on the shelf?",
    "{n} had {a} {t} and lost {b} of them. How many {t} does {n} have?",
]


def problem(rng: random.Random, max_operand: int) -> dict:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if rng.random() < 0.5:
        query, c, op = rng.choice(ADD).format(n=n, t=t, a=a, b=b), a + b, "+"
    else:
        a, b = max(a, b), min(a, b)
        query, c, op = rng.choice(SUB).format(n=n, t=t, a=a, b=b), a - b, "-"
    return {"query": query, "response": f"{a} {op} {b} = {c}. The answer is {c}", "answer": str(c)}


def write_splits(train_path: str, test_path: str, n_train: int, n_test: int, max_operand: int = 10,
                 seed: int = 1234) -> None:
    """Disjoint train/test files (no test query appears in train)."""
    rng = random.Random(seed)
    seen, train, test = set(), [], []
    while len(test) < n_test:
        p = problem(rng, max_operand)
        if p["query"] not in seen:
            seen.add(p["query"])
            test.append(p)
    while len(train) < n_train:
        p = problem(rng, max_operand)
        if p["query"] not in seen:
            train.append(p)
    for path, records in ((train_path, train), (test_path, test)):
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
