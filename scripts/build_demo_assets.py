"""Regenerate the bundled demo assets: the demo chat data set and the tiny model's tokenizer/config.

The conversations are written for sala-train: templated but varied small tasks (arithmetic with
follow-ups, capitals, opposites, plurals, weekdays, animal sounds, counting, spelling, colours),
with and without system prompts, 2-4 user/assistant exchanges each. They are learnable by a
~1M-parameter model in a couple of minutes on a CPU, so the demo's eval loss falls clearly.
Deterministic: running this script again reproduces the committed files byte for byte.

    python scripts/build_demo_assets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "sala_train" / "assets"
N_TRAIN, N_VALIDATION = 360, 40

# fmt: off
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "India": "New Delhi",
    "Australia": "Canberra", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin",
    "Mexico": "Mexico City", "Sweden": "Stockholm",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "open": "closed",
    "happy": "sad", "light": "dark", "early": "late", "full": "empty", "old": "new", "hard": "soft",
    "wet": "dry", "loud": "quiet", "strong": "weak", "rich": "poor",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "box": "boxes", "city": "cities", "knife": "knives",
    "leaf": "leaves", "person": "people", "cat": "cats", "bus": "buses", "baby": "babies",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
    "owl": "hoot", "pig": "oink", "horse": "neigh", "frog": "croak", "bee": "buzz", "snake": "hiss",
}
COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "a ripe banana": "yellow", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "a carrot": "orange", "milk": "white", "a strawberry": "red", "a leaf in summer": "green",
}
WORDS = ["cat", "tree", "lamp", "river", "stone", "apple", "music", "cloud", "bread", "house",
         "table", "green", "night", "smile", "train", "water"]
# fmt: on

SYSTEMS = {
    "plain": "You are a helpful assistant.",
    "brief": "You are a concise assistant. Answer in one short sentence.",
    "friendly": "You are a friendly tutor. Start every answer with 'Sure!'.",
    "pirate": "You are a pirate. Start every answer with 'Arr!'.",
}


def style(system: str | None, answer: str) -> str:
    if system == "friendly":
        return f"Sure! {answer}"
    if system == "pirate":
        return f"Arr! {answer}"
    return answer


def arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice(["plus", "minus", "times"])
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    q = rng.choice([f"What is {a} {op} {b}?", f"Can you compute {a} {op} {b}?", f"{a} {op} {b} = ?"])
    turns = [(q, f"{a} {op} {b} is {value}.")]
    for _ in range(rng.randint(0, 2)):
        c = rng.randint(2, 5)
        op2 = rng.choice(["plus", "times"])
        new = value + c if op2 == "plus" else value * c
        turns.append(
            (
                rng.choice([f"And {op2} {c}?", f"Now {op2} {c}.", f"What if we do {op2} {c}?"]),
                f"{value} {op2} {c} is {new}.",
            )
        )
        value = new
    return turns


def capital(rng: random.Random) -> list[tuple[str, str]]:
    country = rng.choice(list(CAPITALS))
    q = rng.choice(
        [
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Tell me the capital of {country}.",
        ]
    )
    return [(q, f"The capital of {country} is {CAPITALS[country]}.")]


def opposite(rng: random.Random) -> list[tuple[str, str]]:
    word = rng.choice(list(OPPOSITES))
    q = rng.choice([f"What is the opposite of {word}?", f"Give me the opposite of '{word}'."])
    return [(q, f"The opposite of {word} is {OPPOSITES[word]}.")]


def plural(rng: random.Random) -> list[tuple[str, str]]:
    word = rng.choice(list(PLURALS))
    q = rng.choice([f"What is the plural of {word}?", f"How do I say more than one {word}?"])
    return [(q, f"The plural of {word} is {PLURALS[word]}.")]


def weekday(rng: random.Random) -> list[tuple[str, str]]:
    i = rng.randrange(7)
    turns = [(f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.")]
    if rng.random() < 0.5:
        turns.append(("And the day before it?", f"{DAYS[(i - 1) % 7]} comes before {DAYS[i]}."))
    return turns


def sound(rng: random.Random) -> list[tuple[str, str]]:
    animal = rng.choice(list(SOUNDS))
    q = rng.choice([f"What sound does a {animal} make?", f"How does a {animal} sound?"])
    return [(q, f"A {animal} says {SOUNDS[animal]}.")]


def counting(rng: random.Random) -> list[tuple[str, str]]:
    start = rng.randint(1, 15)
    stop = start + rng.randint(2, 5)
    numbers = ", ".join(str(n) for n in range(start, stop + 1))
    return [(f"Count from {start} to {stop}.", f"{numbers}.")]


def spelling(rng: random.Random) -> list[tuple[str, str]]:
    word = rng.choice(WORDS)
    turns = [(f"Spell the word {word}.", f"{word} is spelled {'-'.join(word)}.")]
    if rng.random() < 0.5:
        turns.append(("How many letters is that?", f"{word} has {len(word)} letters."))
    return turns


def colour(rng: random.Random) -> list[tuple[str, str]]:
    thing = rng.choice(list(COLOURS))
    return [(f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}.")]


TASKS = [arithmetic, capital, opposite, plural, weekday, sound, counting, spelling, colour]


def conversation(rng: random.Random) -> dict:
    system_key = rng.choice([None, None, "plain", "brief", "friendly", "pirate"])
    messages = []
    if system_key is not None:
        messages.append({"role": "system", "content": SYSTEMS[system_key]})
    exchanges: list[tuple[str, str]] = []
    while len(exchanges) < rng.randint(2, 4):
        exchanges += rng.choice(TASKS)(rng)
    for question, answer in exchanges[:4]:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": style(system_key, answer)})
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def write_model_config(out: Path, vocab_size: int) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.02,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    rng = random.Random(20261128)
    records = [conversation(rng) for _ in range(N_TRAIN + N_VALIDATION)]
    data_dir = ASSETS / "data" / "demo_chat"
    write_jsonl(data_dir / "train.jsonl", records[:N_TRAIN])
    write_jsonl(data_dir / "validation.jsonl", records[N_TRAIN:])
    texts = [m["content"] for r in records[:N_TRAIN] for m in r["messages"]] + ["system", "user", "assistant"]
    model_dir = ASSETS / "models" / "tiny-chat"
    vocab = build_tokenizer(texts, model_dir)
    write_model_config(model_dir, vocab)
    print(f"wrote {len(records)} conversations and a {vocab}-token tokenizer under {ASSETS}")


if __name__ == "__main__":
    main()
