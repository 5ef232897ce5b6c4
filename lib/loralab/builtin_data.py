"""loralab's built-in dialogue-summary set: small, deterministic, made here.

Short chat dialogues between two people about a plan (meeting, borrowing,
running late, ...), each with a one-sentence reference summary, in the shape of
SAMSum but written from templates by this module, so it can ship with the code
and be regenerated bit-for-bit (``random.Random(seed)`` is stable across Python
versions). The summaries copy names, places and times from the dialogue, which
a small model can learn to do in minutes; that is the point: the default run
shows a base model that cannot summarise and a fine-tuned one that can.
"""

from __future__ import annotations

import random

NAMES = [
    "Amanda", "Jerry", "Olivia", "Tom", "Hannah", "Eric", "Sophie", "Mark", "Laura", "Ben",
    "Emma", "Jack", "Chloe", "Adam", "Mia", "Peter", "Lucy", "Sam", "Kate", "Nick",
    "Julia", "Paul", "Anna", "Greg", "Ella", "Ryan", "Zoe", "Dan", "Nina", "Luke",
]
PLACES = ["the cinema", "the gym", "the park", "the library", "the station", "the cafe",
          "the office", "the mall", "the beach", "the museum", "the pub", "the market"]
TIMES = ["at 5", "at 6", "at 7", "at 8", "tomorrow", "on Friday", "on Monday",
         "tonight", "at noon", "on Sunday", "after work", "next week"]
ACTIVITIES = [("see a film", "a film"), ("play tennis", "tennis"), ("have lunch", "lunch"),
              ("study", "studying"), ("go running", "running"), ("have coffee", "coffee"),
              ("go shopping", "shopping"), ("watch the match", "the match")]
ITEMS = ["charger", "umbrella", "bike", "notes", "laptop", "car", "book", "camera", "keys", "drill"]
REASONS = ["is ill", "has to work late", "is visiting family", "missed the bus",
           "has an exam", "is stuck in traffic"]
MINUTES = ["10", "15", "20", "30", "45"]


def _meet(r: random.Random, a: str, b: str) -> tuple[str, str]:
    act, _ = r.choice(ACTIVITIES)
    place, time = r.choice(PLACES), r.choice(TIMES)
    lines = [f"{a}: Hi {b}! Do you want to {act} {time}?",
             f"{b}: Sure, where?",
             f"{a}: {place.capitalize()}?",
             f"{b}: Great, see you there {time}!"]
    return "\n".join(lines), f"{a} and {b} will {act} at {place} {time}."


def _decline(r: random.Random, a: str, b: str) -> tuple[str, str]:
    act, _ = r.choice(ACTIVITIES)
    time, reason = r.choice(TIMES), r.choice(REASONS)
    lines = [f"{a}: Hey, shall we {act} {time}?",
             f"{b}: Sorry, I can't. I {reason.replace('is ', 'am ').replace('has ', 'have ')}.",
             f"{a}: Oh no. Maybe another time then.",
             f"{b}: Yes, definitely!"]
    return "\n".join(lines), f"{b} can't {act} with {a} {time} because {b} {reason}."


def _borrow(r: random.Random, a: str, b: str) -> tuple[str, str]:
    item, time = r.choice(ITEMS), r.choice(TIMES)
    lines = [f"{a}: {b}, can I borrow your {item}?",
             f"{b}: Yes, no problem. When do you need it?",
             f"{a}: {time.capitalize()}, if that's ok.",
             f"{b}: Fine, I'll bring it {time}."]
    return "\n".join(lines), f"{b} will lend {a} the {item} {time}."


def _late(r: random.Random, a: str, b: str) -> tuple[str, str]:
    mins, place = r.choice(MINUTES), r.choice(PLACES)
    lines = [f"{a}: I'm running late, sorry!",
             f"{b}: How late?",
             f"{a}: About {mins} minutes. Wait for me at {place}.",
             f"{b}: Ok, I'll wait."]
    return "\n".join(lines), f"{a} will be {mins} minutes late and {b} will wait at {place}."


def _lost(r: random.Random, a: str, b: str) -> tuple[str, str]:
    item, place = r.choice(ITEMS), r.choice(PLACES)
    lines = [f"{a}: Have you seen my {item}?",
             f"{b}: I think you left it at {place}.",
             f"{a}: Thanks, I'll go and get it."]
    return "\n".join(lines), f"{a} left the {item} at {place}."


SCENARIOS = (_meet, _decline, _borrow, _late, _lost)


def make_builtin_dataset(n_train: int = 2000, n_val: int = 200, n_test: int = 200,
                         seed: int = 1234) -> dict[str, list[dict[str, str]]]:
    """The built-in splits: {"train", "val", "test"} -> [{"dialogue", "summary"}].

    Deterministic for a given seed. Splits are drawn from one stream, so no
    dialogue in val/test is a copy of a train one by construction of the ids;
    identical texts can still recur (the templates are small), as in real data.
    """
    r = random.Random(seed)
    rows = []
    for _ in range(n_train + n_val + n_test):
        a, b = r.sample(NAMES, 2)
        dialogue, summary = r.choice(SCENARIOS)(r, a, b)
        rows.append({"dialogue": dialogue, "summary": summary})
    return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val],
            "test": rows[n_train + n_val:]}
