"""Write quickstart.jsonl: small multi-turn unit-conversion chats in OpenAI `messages` form.

The answers follow one exact, learnable style, so a short LoRA run visibly lowers the
loss on held-out conversations. Rerun to regenerate: python examples/data/make_quickstart.py
"""

import json
import random
from pathlib import Path

UNITS = [
    ("kilometres", "miles", 0.621371), ("miles", "kilometres", 1.609344), ("kilograms", "pounds", 2.204623),
    ("pounds", "kilograms", 0.453592), ("litres", "gallons", 0.264172), ("metres", "feet", 3.280840),
    ("feet", "metres", 0.3048), ("inches", "centimetres", 2.54), ("centimetres", "inches", 0.393701),
]
SYSTEM = "You are UnitBot. Answer conversions in one line: 'X a = Y b.' rounded to two decimals."


def answer(value: float, src: str, dst: str, factor: float) -> str:
    return f"{value:g} {src} = {value * factor:.2f} {dst}."


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(rng.randint(1, 3)):
        src, dst, factor = rng.choice(UNITS)
        value = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 99), 1)])
        ask = rng.choice(["How many {d} is {v} {s}?", "Convert {v} {s} to {d}.", "{v} {s} in {d}, please."])
        messages.append({"role": "user", "content": ask.format(v=f"{value:g}", s=src, d=dst)})
        messages.append({"role": "assistant", "content": answer(value, src, dst, factor)})
    return {"messages": messages}


if __name__ == "__main__":
    rng = random.Random(0)
    out = Path(__file__).with_name("quickstart.jsonl")
    out.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(240)), encoding="utf-8")
    print(f"wrote {out}")
