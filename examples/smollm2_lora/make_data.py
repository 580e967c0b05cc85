"""Writes the date-rewriting dataset used by train.py: data/train.jsonl and data/test.jsonl.

Task: rewrite an ISO date as "day month-name year", e.g. "2024-03-07" -> "7 March 2024". It has one
right answer, so exact match is a fair score; SmolLM2-135M-Instruct gets almost none right out of the box
(it echoes the ISO date back), yet a LoRA adapter learns it in a few minutes on a CPU.

The output is deterministic for a given --seed, so the committed files can be regenerated and diffed:

    python examples/smollm2_lora/make_data.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRST_DAY = dt.date(1900, 1, 1)
LAST_DAY = dt.date(2099, 12, 31)
# Spelled out rather than taken from `calendar.month_name`, which follows the locale.
MONTHS = [
    *("January", "February", "March", "April", "May", "June"),
    *("July", "August", "September", "October", "November", "December"),
]


def make_example(date: dt.date) -> dict[str, str]:
    return {
        "prompt": f"Rewrite {date.isoformat()} as day month year.",
        "answer": f"{date.day} {MONTHS[date.month - 1]} {date.year}",
    }


def sample_dates(n: int, rng: random.Random) -> list[dt.date]:
    # Sampling distinct days (not distinct examples after the fact) keeps train and test disjoint.
    span = (LAST_DAY - FIRST_DAY).days + 1
    return [FIRST_DAY + dt.timedelta(days=offset) for offset in rng.sample(range(span), n)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=400, help="number of training examples")
    parser.add_argument("--test", type=int, default=100, help="number of test examples")
    parser.add_argument("--out-dir", type=Path, default=HERE / "data")
    args = parser.parse_args()

    dates = sample_dates(args.train + args.test, random.Random(args.seed))
    train, test = dates[: args.train], dates[args.train :]
    # Every month name must be seen in training, or the test set would ask for words never taught.
    assert {d.month for d in train} == set(range(1, 13)), "training set misses a month; change --seed"

    write_jsonl(args.out_dir / "train.jsonl", [make_example(d) for d in train])
    write_jsonl(args.out_dir / "test.jsonl", [make_example(d) for d in test])
    print(f"wrote {len(train)} train / {len(test)} test examples to {args.out_dir}")


if __name__ == "__main__":
    main()
