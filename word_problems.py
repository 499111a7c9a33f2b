"""word_problems.py — one-step word problems with small numbers, generated offline, for RL on a small real model.

The task: short natural-language problems that need one addition or subtraction of numbers below 20, e.g. "Mia has
7 stickers. Mia gets 5 more. How many stickers does Mia have now?" → "12". The answer column is a bare number string,
graded by `--reward math` (rewards.math_reward: `#### n`, `\\boxed{n}`, else the LAST number of the completion, by
numeric equality). `python word_problems.py --out DIR` writes DIR/train.jsonl and DIR/test.jsonl (columns
question, answer, solution): `train.py --dataset DIR` reads them as the splits train and test. The train and test
problems are drawn from disjoint (template, numbers) triples, so the test split is held out.

Why it is a fair test for SmolLM2-135M-Instruct (benchmarks/README.md, "A real model"): its knowledge suffices (it
writes "9 + 6 = 15" for many of these), yet it does not reliably succeed at the start. Greedy, with its chat template,
it restates the question, adds a sentence after the sum, or slips ("2 + 6 = 10"): the grader reads the last number,
so a right sum followed by more text, or an answer cut at --max-new-tokens, scores 0. What RL has to learn is to end
with the right number within the token budget: the behaviour an RL-on-verifiable-rewards run teaches first.
"""

import argparse
import json
import os

import numpy as np

DATA_SEED = 1234  # fixed: the same files on every machine

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Lily", "Ben", "Emma", "Noah", "Ella", "Max"]
ITEMS = ["apples", "stickers", "marbles", "books", "pencils", "cookies", "cards", "shells", "coins", "toys"]

# One template per operation and phrasing: (operation, text). {n} a name, {x} an item, {a} {b} the numbers.
# Subtraction always has a > b, division is exact (a = b × q), so every answer is a positive whole number.
TEMPLATES: list[tuple[str, str]] = [
    ("+", "{n} has {a} {x}. {n} gets {b} more. How many {x} does {n} have now?"),
    ("+", "There are {a} {x} in a basket and {b} {x} on the table. How many {x} are there in all?"),
    ("+", "{n} collected {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did {n} collect in total?"),
    ("-", "{n} had {a} {x} and gave {b} of them away. How many {x} does {n} have left?"),
    ("-", "A shop had {a} {x}. It sold {b} of them. How many {x} are left in the shop?"),
    ("-", "{n} has {a} {x}. {n} loses {b} of them. How many {x} does {n} have now?"),
]


def draw_numbers(op: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(a, b, answer): a sum of two numbers from 1 to 9, or a difference a − b with 2 ≤ a ≤ 18, 1 ≤ b < a, b ≤ 9."""
    if op == "+":
        a, b = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        return a, b, a + b
    a = int(rng.integers(2, 19))
    b = int(rng.integers(1, min(a, 10)))
    return a, b, a - b


def make_problem(rng: np.random.Generator) -> tuple[str, str, str, tuple]:
    """One (question, answer, solution, key): the solution is the worked line "7 + 5 = 12" (a demonstration for
    --algo sft with --answer-column solution); key identifies the template and numbers (for the disjoint split)."""
    t = int(rng.integers(len(TEMPLATES)))
    op, text = TEMPLATES[t]
    a, b, answer = draw_numbers(op, rng)
    name, item = NAMES[int(rng.integers(len(NAMES)))], ITEMS[int(rng.integers(len(ITEMS)))]
    return text.format(n=name, x=item, a=a, b=b), str(answer), f"{a} {op} {b} = {answer}", (t, a, b)


def write_task(path: str, n_train: int = 4000, n_test: int = 200, seed: int = DATA_SEED) -> tuple[str, str]:
    """Write path/train.jsonl and path/test.jsonl, deterministic in `seed`; test keys never occur in train.
    Returns the two file paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    test, test_keys = [], set()
    while len(test) < n_test:  # the test split first, its (template, a, b) keys distinct
        q, a, solution, key = make_problem(rng)
        if key not in test_keys:
            test_keys.add(key)
            test.append({"question": q, "answer": a, "solution": solution})
    train = []
    while len(train) < n_train:  # training rows may repeat among themselves, never a test key
        q, a, solution, key = make_problem(rng)
        if key not in test_keys:
            train.append({"question": q, "answer": a, "solution": solution})
    files = os.path.join(path, "train.jsonl"), os.path.join(path, "test.jsonl")
    for file, rows in zip(files, (train, test)):
        with open(file, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=4000, help="training problems (default: 4000)")
    parser.add_argument("--test", type=int, default=200, help="held-out test problems (default: 200)")
    parser.add_argument("--seed", type=int, default=DATA_SEED, help=f"data seed (default: {DATA_SEED})")
    args = parser.parse_args()
    for file in write_task(args.out, args.train, args.test, args.seed):
        print(f"wrote {file}")


if __name__ == "__main__":
    main()
