"""Speed of `tunelab data dedup` on synthetic records: prints records/s for the whole run
(both passes, exact + near-duplicate detection, writing the output).

    python bench/dedup_speed.py [--records 100000] [--near 0.9]

One record in ten is an edited copy of an earlier one (one character changed), so the
LSH index sees real candidate traffic; the rest are distinct Chinese/English mixes.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunelab.data.tools.dedup import dedup_file

WORDS = ("hotel room price rating breakfast wifi subway near quiet clean cheap luxury "
         "酒店 价格 评分 早餐 地铁 安静 干净 经济型 豪华型 推荐 预订 入住").split()


def synthetic(n: int, seed: int = 0):
    rng = random.Random(seed)
    made: list[str] = []
    for i in range(n):
        if made and i % 10 == 9:
            base = list(rng.choice(made))
            for _ in range(1):
                base[rng.randrange(len(base))] = rng.choice("abcdefg的了")
            text = "".join(base)
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            if len(made) < 5000:
                made.append(text)
        yield {"instruction": text, "output": f"answer {i}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--near", type=float, default=0.9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "synthetic.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for record in synthetic(args.records):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        start, cpu_start = time.perf_counter(), time.process_time()
        result = dedup_file(src, Path(tmp) / "out.jsonl", near=args.near)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # CPU time too: on a shared machine the wall clock also measures the neighbours.
    print(f"{args.records} records in {seconds:.1f} s wall ({args.records / seconds:,.0f} records/s), "
          f"{cpu:.1f} s CPU ({args.records / cpu:,.0f} records/s); exact removed {result.count('exact')}, "
          f"near removed {result.count('near')}, kept {result.written}")


if __name__ == "__main__":
    main()
