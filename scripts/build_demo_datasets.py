"""Regenerate the bundled demo data sets of the other formats from the demo chat tasks.

One small set per ``dataset.format`` (alpaca, sharegpt, preference, kto, text), and a tool-call
set in LLaMA-Factory's glaive_toolcall layout (sharegpt with ``function_call``/``observation`` turns
and a ``tools`` column), written for sala-train from the same task vocabulary as the demo chats
(so the tiny tokenizer covers it).
In the preference and KTO sets the good reply follows one learnable pattern: it is the right
answer and starts with "Sure!"; the bad reply is another task's answer. Deterministic.

    python scripts/build_demo_datasets.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_assets import ASSETS, CAPITALS, OPPOSITES, PLURALS, SYSTEMS, TASKS, write_jsonl

N_TRAIN, N_VALIDATION = 200, 40


def pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while len(out) < n:
        out += rng.choice(TASKS)(rng)
    return out[:n]


def alpaca(rng: random.Random) -> dict:
    (question, answer), *history = pairs(rng, rng.choice([1, 1, 2, 3]))
    record: dict = {"instruction": question, "input": "", "output": answer}
    if rng.random() < 0.3:
        record = {"instruction": "Answer the question.", "input": question, "output": answer}
    if history:
        record["history"] = [[q, a] for q, a in history]
    if rng.random() < 0.3:
        record["system"] = SYSTEMS["plain"]
    return record


def sharegpt(rng: random.Random) -> dict:
    turns = []
    for question, answer in pairs(rng, rng.randint(1, 3)):
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record: dict = {"conversations": turns}
    if rng.random() < 0.3:
        record["system"] = SYSTEMS["brief"]
    return record


def good_and_bad(rng: random.Random) -> tuple[str, str, str]:
    (question, answer), (_, other) = pairs(rng, 2)
    while other == answer:
        other = pairs(rng, 1)[0][1]
    return question, f"Sure! {answer}", other


def preference(rng: random.Random) -> dict:
    question, good, bad = good_and_bad(rng)
    return {"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}  # fmt: skip


def kto(rng: random.Random, desirable: bool) -> dict:
    question, good, bad = good_and_bad(rng)
    completion = [{"role": "assistant", "content": good if desirable else bad}]
    return {"prompt": [{"role": "user", "content": question}], "completion": completion, "label": desirable}


def text(rng: random.Random) -> dict:
    return {"text": " ".join(f"Q: {q} A: {a}" for q, a in pairs(rng, rng.randint(3, 8)))}


def _tool(name: str, description: str, argument: str) -> dict:
    parameters = {"type": "object", "properties": {argument: {"type": "string"}}, "required": [argument]}
    return {"name": name, "description": description, "parameters": parameters}


# name -> (schema, the argument's values and results, question, final answer)
TOOLS = {
    "get_capital": (_tool("get_capital", "The capital city of a country", "country"), CAPITALS,
                    "What is the capital of {}?", "The capital of {} is {}."),
    "get_plural": (_tool("get_plural", "The plural of an English noun", "word"), PLURALS,
                   "What is the plural of {}?", "The plural of {} is {}."),
    "get_opposite": (_tool("get_opposite", "The opposite of a word", "word"), OPPOSITES,
                     "What is the opposite of {}?", "The opposite of {} is {}."),
}  # fmt: skip


def toolcall(rng: random.Random) -> dict:
    """A question answered through one tool call (three in four), or directly with tools on offer."""
    offered = rng.sample(sorted(TOOLS), rng.randint(1, 3))
    record_tools = [TOOLS[name][0] for name in offered]
    if rng.random() < 0.25:
        question, answer = rng.choice([t for t in TASKS if t.__name__ in ("sound", "counting")])(rng)[0]
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    else:
        name = rng.choice(offered)
        schema, table, question, answer = TOOLS[name]
        key = rng.choice(sorted(table))
        argument = next(iter(schema["parameters"]["properties"]))
        call = {"name": name, "arguments": {argument: key}}
        turns = [
            {"from": "human", "value": question.format(key)},
            {"from": "function_call", "value": json.dumps(call, ensure_ascii=False)},
            {"from": "observation", "value": json.dumps({"result": table[key]}, ensure_ascii=False)},
            {"from": "gpt", "value": answer.format(key, table[key])},
        ]
    return {"conversations": turns, "tools": json.dumps(record_tools, ensure_ascii=False)}


def write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def held_out(records: list[dict], make, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, validation): a validation record that is also a training record (the task vocabulary
    is small, so draws repeat) is drawn again, from ``rng``, a generator of its own: the training
    records and every set drawn after stay as they were."""
    train, validation = records[:N_TRAIN], records[N_TRAIN:]
    seen = {json.dumps(r, sort_keys=True) for r in train}
    for i, record in enumerate(validation):
        while json.dumps(record, sort_keys=True) in seen:
            record = make(rng, i)
        validation[i] = record
        seen.add(json.dumps(record, sort_keys=True))
    return train, validation


def main() -> None:
    rng = random.Random(20261129)
    again = random.Random(20261205)  # (validation records drawn again: see held_out)
    n = N_TRAIN + N_VALIDATION
    data = ASSETS / "data"
    for name, make, writer, suffix in (
        ("demo_alpaca", lambda r, i: alpaca(r), write_json, "json"),
        ("demo_sharegpt", lambda r, i: sharegpt(r), write_json, "json"),
        ("demo_preference", lambda r, i: preference(r), write_jsonl, "jsonl"),
        ("demo_text", lambda r, i: text(r), write_jsonl, "jsonl"),
        ("demo_kto", lambda r, i: kto(r, desirable=i % 2 == 0), write_jsonl, "jsonl"),
        ("demo_toolcall", lambda r, i: toolcall(r), write_json, "json"),
    ):
        train, validation = held_out([make(rng, i) for i in range(n)], make, again)
        writer(data / name / f"train.{suffix}", train)
        writer(data / name / f"validation.{suffix}", validation)
    print(f"wrote demo_alpaca, demo_sharegpt, demo_preference, demo_kto, demo_text, demo_toolcall under {data}")


if __name__ == "__main__":
    main()
