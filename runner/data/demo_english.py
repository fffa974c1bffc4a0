"""Synthetic English demo data for the `chat` and `alpaca` starters.

Two small sets a tiny model learns in a few minutes on a CPU:

- ``alpaca-demo``: instruction / input / output rows (a few kinds of task, some without an
  input). Every output is a fixed sentence pattern per task that quotes the input's words, so
  the mapping is clear: the fine-tuned model learns to copy the right words into the right
  pattern.
- ``chat-demo``: multi-turn ``messages`` conversations (shop, cafe, weather, meeting), two or
  three user turns, each reply repeating words said earlier (the item, the drink, the city),
  sometimes with a system prompt.

The vocabulary is small and every sentence is written for this project. Deterministic for a
seed; regenerate the shipped files (byte-identical) with
``python -m runner.data.demo_english --out data``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runner.data.demo import write_files

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")
MATERIALS = ("wood", "glass", "metal", "cotton", "wool", "leather", "paper", "stone")
ITEMS = ("lamp", "chair", "table", "bag", "cup", "box", "clock", "vase", "scarf", "basket")
# what each item is good for: the description's second sentence, a stable function of the item
USES = {
    "lamp": "It gives a warm light in the evening.",
    "chair": "It is a comfortable seat for long days.",
    "table": "It has room for the whole family.",
    "bag": "It carries everything you need.",
    "cup": "It keeps your tea hot.",
    "box": "It keeps small things safe.",
    "clock": "It always shows the right time.",
    "vase": "It holds fresh flowers from the garden.",
    "scarf": "It keeps you warm in winter.",
    "basket": "It is easy to carry to the market.",
}
PRICES = {item: 5 + 3 * i for i, item in enumerate(ITEMS)}
EVENTS = ("picnic", "party", "dinner", "concert", "game night", "book club", "bike ride")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PLACES = ("the park", "the library", "the beach", "my house", "the garden", "the river")
TIMES = ("nine", "ten", "eleven", "noon", "two", "four", "six", "eight")
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack")
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "early": "late",
    "open": "closed",
    "full": "empty",
    "light": "dark",
    "old": "new",
    "high": "low",
    "wet": "dry",
    "loud": "quiet",
}
ANIMALS = {
    "cat": "meow",
    "dog": "woof",
    "cow": "moo",
    "duck": "quack",
    "sheep": "baa",
    "owl": "hoot",
    "horse": "neigh",
    "bee": "buzz",
}
ROOMS = {
    "kitchen": ("a kettle", "a spoon", "a plate"),
    "garden": ("a flower", "a tree", "a bench"),
    "library": ("a book", "a desk", "a map"),
    "bathroom": ("a towel", "a mirror", "a brush"),
    "classroom": ("a pencil", "a board", "a chair"),
    "beach": ("a shell", "a towel", "a bucket"),
}
DRINKS = ("tea", "coffee", "hot chocolate", "lemonade", "orange juice")
SIZES = ("small", "medium", "large")
FOODS = ("muffin", "sandwich", "cookie", "croissant", "salad")
CITIES = ("Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Dublin", "Madrid")
WEATHER = ("sunny", "rainy", "cloudy", "windy", "snowy")
SYSTEMS = ("You are a friendly assistant.", "You are a helpful assistant. Answer briefly.")
SYSTEM_RATE = 0.3

ALPACA_TRAIN_ROWS, ALPACA_TRAIN_SEED = 1200, 11
ALPACA_DEV_ROWS, ALPACA_DEV_SEED = 100, 12
CHAT_TRAIN_ROWS, CHAT_TRAIN_SEED = 1000, 21
CHAT_DEV_ROWS, CHAT_DEV_SEED = 100, 22


def _describe(rng: random.Random) -> dict[str, str]:
    item, colour, material = rng.choice(ITEMS), rng.choice(COLOURS), rng.choice(MATERIALS)
    return {
        "instruction": "Describe this item in two sentences.",
        "input": f"item: {item}; colour: {colour}; material: {material}",
        "output": f"This {colour} {item} is made of {material}. {USES[item]}",
    }


def _invite(rng: random.Random) -> dict[str, str]:
    event, day, place = rng.choice(EVENTS), rng.choice(DAYS), rng.choice(PLACES)
    return {
        "instruction": "Write a short invitation.",
        "input": f"event: {event}; day: {day}; place: {place}",
        "output": f"Please join us for a {event} at {place} on {day}. We hope to see you there!",
    }


def _thanks(rng: random.Random) -> dict[str, str]:
    name, colour, item = rng.choice(NAMES), rng.choice(COLOURS), rng.choice(ITEMS)
    return {
        "instruction": "Write a thank you note.",
        "input": f"name: {name}; gift: a {colour} {item}",
        "output": f"Dear {name}, thank you for the {colour} {item}. It was very kind of you.",
    }


def _opposite(rng: random.Random) -> dict[str, str]:
    word = rng.choice(sorted(OPPOSITES))
    return {
        "instruction": "Give the opposite of this word.",
        "input": word,
        "output": f"The opposite of {word} is {OPPOSITES[word]}.",
    }


def _animal(rng: random.Random) -> dict[str, str]:
    animal = rng.choice(sorted(ANIMALS))
    return {
        "instruction": f"What sound does a {animal} make?",
        "input": "",
        "output": f"A {animal} says {ANIMALS[animal]}.",
    }


def _room(rng: random.Random) -> dict[str, str]:
    room = rng.choice(sorted(ROOMS))
    a, b, c = ROOMS[room]
    return {
        "instruction": f"Name three things you can find in a {room}.",
        "input": "",
        "output": f"In a {room} you can find {a}, {b} and {c}.",
    }


TASKS: tuple[Callable[[random.Random], dict[str, str]], ...] = (
    _describe,
    _invite,
    _thanks,
    _opposite,
    _animal,
    _room,
)
TASK_WEIGHTS = (3, 3, 3, 1, 1, 1)


def generate_alpaca(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"instruction", "input", "output"}``, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [rng.choices(TASKS, weights=TASK_WEIGHTS)[0](rng) for _ in range(n)]


Turns = list[tuple[str, str]]


def _shop(rng: random.Random) -> Turns:
    item, colour, material = rng.choice(ITEMS), rng.choice(COLOURS), rng.choice(MATERIALS)
    turns = [
        (
            f"Hello, do you have a {colour} {item}?",
            f"Yes, we have a {colour} {item} made of {material}.",
        ),
        ("How much is it?", f"The {colour} {item} costs {PRICES[item]} dollars."),
    ]
    if rng.random() < 0.6:
        turns.append(("I will take it, thank you.", f"Thank you! Enjoy your new {colour} {item}."))
    return turns


def _cafe(rng: random.Random) -> Turns:
    drink, size = rng.choice(DRINKS), rng.choice(SIZES)
    first = (f"Can I have a {size} {drink}, please?", f"Sure, one {size} {drink}. Anything to eat?")
    if rng.random() < 0.5:
        food = rng.choice(FOODS)
        second = (
            f"Yes, a {food}, please.",
            f"Here is your {size} {drink} and a {food}. Enjoy!",
        )
    else:
        second = ("No, thank you.", f"Here is your {size} {drink}. Have a nice day!")
    return [first, second]


def _weather(rng: random.Random) -> Turns:
    city, weather = rng.choice(CITIES), rng.choice(WEATHER)
    umbrella = (
        f"Yes, take an umbrella. It is {weather} in {city}."
        if weather in ("rainy", "snowy")
        else f"No, you will not need an umbrella in {city} today."
    )
    return [
        (f"What is the weather like in {city} today?", f"It is {weather} in {city} today."),
        ("Should I take an umbrella?", umbrella),
    ]


def _meeting(rng: random.Random) -> Turns:
    day, time, place = rng.choice(DAYS), rng.choice(TIMES), rng.choice(PLACES)
    return [
        (f"Can we meet on {day}?", f"Yes, {day} works for me. What time?"),
        (f"How about {time} at {place}?", f"Great, see you on {day} at {time} at {place}."),
    ]


SCENES: tuple[Callable[[random.Random], Turns], ...] = (_shop, _cafe, _weather, _meeting)


def generate_chat(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows ``{"messages": [{role, content}, ...]}`` (2-3 user turns, each answered; some
    open with a system prompt), deterministic for ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = rng.choice(SCENES)(rng)
        messages = []
        if rng.random() < SYSTEM_RATE:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for user, assistant in turns:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        rows.append({"messages": messages})
    return rows


def shipped_files() -> dict[str, list[dict[str, Any]]]:
    """The shipped files, relative to data/, and their rows."""
    return {
        "alpaca-demo/train.jsonl": generate_alpaca(ALPACA_TRAIN_ROWS, ALPACA_TRAIN_SEED),
        "alpaca-demo/dev.jsonl": generate_alpaca(ALPACA_DEV_ROWS, ALPACA_DEV_SEED),
        "chat-demo/train.jsonl": generate_chat(CHAT_TRAIN_ROWS, CHAT_TRAIN_SEED),
        "chat-demo/dev.jsonl": generate_chat(CHAT_DEV_ROWS, CHAT_DEV_SEED),
    }


def write_english_demos(out_dir: str | Path) -> dict[str, int]:
    """Write the alpaca-demo and chat-demo files under ``out_dir``; return row counts."""
    return write_files(out_dir, shipped_files())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the English alpaca and chat demo data.")
    parser.add_argument("--out", default="data", help="folder that gets alpaca-demo/, chat-demo/")
    args = parser.parse_args(argv)
    for name, rows in write_english_demos(args.out).items():
        print(f"wrote {Path(args.out) / name} ({rows} rows)")


if __name__ == "__main__":
    main()
