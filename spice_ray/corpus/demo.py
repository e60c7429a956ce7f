"""A small, deterministic, generated instruction corpus for the demo and the tests.

``generate_demo_corpus`` returns raw input rows in all four accepted input formats, so the demo
exercises the same reader and normaliser as a real corpus:

- alpaca ``{"instruction", "input", "output"}`` (most rows),
- prompt/response ``{"prompt", "response"}``,
- chat ``{"messages": [{"role", "content"}, ...]}`` (some with a system turn, some multi-turn),
- ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``.

Every row carries a ``source`` naming its task family (arithmetic, sort_list, reverse_string,
capitals, unit_conversion, word_count, pig_latin, multi_turn). About 5% of rows are near-duplicates
of an earlier row (same task, a tiny wording change, same family) and about 5% are ``noisy``: a
question asked elsewhere in the corpus with a deliberately wrong answer. Rows may also repeat
exactly by chance (same question in another format), which ingest deduplicates.

Nothing here needs a tokenizer: the built-in tokenizer is itself trained on this corpus.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Australia": "Canberra",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Morocco": "Rabat",
}

WORDS = [
    "apple", "river", "mountain", "green", "quiet", "window", "garden", "silver", "planet", "music",
    "bread", "candle", "forest", "little", "yellow", "ocean", "thunder", "pencil", "market", "winter",
    "summer", "dragon", "paper", "stone", "cloud", "happy", "orange", "rabbit", "violin", "bridge",
]

# (name, factor or function, from unit, to unit)
CONVERSIONS: list[tuple[str, Callable[[float], float], str, str]] = [
    ("km_to_miles", lambda x: x * 0.621371, "kilometers", "miles"),
    ("miles_to_km", lambda x: x * 1.609344, "miles", "kilometers"),
    ("kg_to_lb", lambda x: x * 2.204623, "kilograms", "pounds"),
    ("c_to_f", lambda x: x * 9 / 5 + 32, "degrees Celsius", "degrees Fahrenheit"),
    ("m_to_ft", lambda x: x * 3.28084, "meters", "feet"),
    ("l_to_gal", lambda x: x * 0.264172, "liters", "US gallons"),
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You answer questions accurately.",
]


@dataclass
class _Example:
    """One generated task before it is written in an input format."""

    family: str
    instruction: str
    output: str
    input: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # multi-turn only: (role, content)


def _pig_latin_word(word: str) -> str:
    vowels = "aeiou"
    if word[0] in vowels:
        return word + "way"
    for i, ch in enumerate(word):
        if ch in vowels:
            return word[i:] + word[:i] + "ay"
    return word + "ay"


def _arithmetic(rng: random.Random) -> _Example:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {word} {b}.", f"Calculate {a} {op} {b}."])
    return _Example("arithmetic", q, f"{a} {op} {b} = {value}.")


def _sort_list(rng: random.Random) -> _Example:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    order = rng.choice(["ascending", "descending"])
    result = sorted(nums, reverse=order == "descending")
    return _Example(
        "sort_list",
        f"Sort the following numbers in {order} order.",
        ", ".join(map(str, result)),
        input=", ".join(map(str, nums)),
    )


def _reverse_string(rng: random.Random) -> _Example:
    word = rng.choice(WORDS) + rng.choice(["", "", rng.choice(WORDS)])
    return _Example("reverse_string", f"Reverse the string '{word}'.", word[::-1])


def _capitals(rng: random.Random) -> _Example:
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."])
    return _Example("capitals", q, f"The capital of {country} is {CAPITALS[country]}.")


def _unit_conversion(rng: random.Random) -> _Example:
    _, fn, src, dst = rng.choice(CONVERSIONS)
    x = rng.randint(1, 200)
    return _Example("unit_conversion", f"Convert {x} {src} to {dst}.", f"{x} {src} is about {fn(x):.2f} {dst}.")


def _word_count(rng: random.Random) -> _Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    sentence = " ".join(words).capitalize() + "."
    return _Example(
        "word_count",
        "How many words are in the following sentence?",
        f"The sentence has {len(words)} words.",
        input=sentence,
    )


def _pig_latin(rng: random.Random) -> _Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    return _Example(
        "pig_latin",
        "Translate the following words into Pig Latin.",
        " ".join(_pig_latin_word(w) for w in words),
        input=" ".join(words),
    )


def _multi_turn(rng: random.Random) -> _Example:
    country = rng.choice(sorted(CAPITALS))
    other = rng.choice(sorted(set(CAPITALS) - {country}))
    turns = [
        ("user", f"What is the capital of {country}?"),
        ("assistant", f"The capital of {country} is {CAPITALS[country]}."),
        ("user", f"And the capital of {other}?"),
        ("assistant", f"The capital of {other} is {CAPITALS[other]}."),
    ]
    if rng.random() < 0.5:
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        turns += [("user", f"Now add {a} and {b}."), ("assistant", f"{a} + {b} = {a + b}.")]
    return _Example("multi_turn", turns[0][1], turns[1][1], turns=turns)


_FAMILIES: list[Callable[[random.Random], _Example]] = [
    _arithmetic,
    _sort_list,
    _reverse_string,
    _capitals,
    _unit_conversion,
    _word_count,
    _pig_latin,
    _multi_turn,
]

_REWORDINGS = [
    ("What is", "What's"),
    ("Sort the following", "Please sort the following"),
    ("Reverse the string", "Reverse this string:"),
    ("Name the capital city", "Tell me the capital city"),
    ("Convert", "Please convert"),
    ("How many words are in", "Count the words in"),
    ("Translate the following", "Translate these"),
    ("Compute", "Please compute"),
    ("Calculate", "Work out"),
]


def _near_duplicate(ex: _Example, rng: random.Random) -> _Example:
    """The same task with a tiny wording change (same answer, same family)."""
    text = ex.instruction
    for old, new in _REWORDINGS:
        if old in text:
            text = text.replace(old, new, 1)
            break
    else:
        text = text.rstrip(".?") + rng.choice([" please.", "?", " (short answer)."])
    return _Example(ex.family, text, ex.output, input=ex.input)


def _noisy(rng: random.Random) -> _Example:
    """A question asked elsewhere with a deliberately wrong (contradicting) answer."""
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        wrong = rng.choice(sorted(set(CAPITALS.values()) - {CAPITALS[country]}))
        return _Example("noisy", f"What is the capital of {country}?", f"The capital of {country} is {wrong}.")
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return _Example("noisy", f"What is {a} + {b}?", f"{a} + {b} = {a + b + rng.choice([-3, -1, 1, 2, 10])}.")


def _chat_turns(ex: _Example) -> list[tuple[str, str]]:
    if ex.turns:
        return list(ex.turns)
    user = ex.instruction if not ex.input else f"{ex.instruction}\n\n{ex.input}"
    return [("user", user), ("assistant", ex.output)]


def _render(ex: _Example, fmt: str, rng: random.Random) -> dict:
    """``ex`` as a raw row of input format ``fmt`` (with its ``source``)."""
    if fmt == "alpaca":
        return {"instruction": ex.instruction, "input": ex.input, "output": ex.output, "source": ex.family}
    if fmt == "prompt_response":
        return {"prompt": _chat_turns(ex)[0][1], "response": ex.output, "source": ex.family}
    turns = _chat_turns(ex)
    if rng.random() < 0.25:
        turns = [("system", rng.choice(SYSTEM_PROMPTS))] + turns
    if fmt == "messages":
        return {"messages": [{"role": r, "content": c} for r, c in turns], "source": ex.family}
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[r], "value": c} for r, c in turns], "source": ex.family}


def _pick_format(ex: _Example, rng: random.Random) -> str:
    r = rng.random()
    if ex.turns:  # multi-turn: chat formats only
        return "messages" if r < 0.6 else "sharegpt"
    if r < 0.55:
        return "alpaca"
    if r < 0.70:
        return "prompt_response"
    if r < 0.85:
        return "messages"
    return "sharegpt"


def generate_demo_corpus(n: int = 600, seed: int = 0) -> list[dict]:
    """``n`` raw rows (mixed input formats), a pure function of ``(n, seed)``."""
    rng = random.Random(seed)
    rows: list[dict] = []
    base: list[_Example] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05 and base:
            ex = _near_duplicate(rng.choice(base), rng)
        elif r < 0.10:
            ex = _noisy(rng)
        else:
            ex = rng.choice(_FAMILIES)(rng)
            if not ex.turns:
                base.append(ex)
        rows.append(_render(ex, _pick_format(ex, rng), rng))
    return rows


def row_format(row: dict) -> str:
    """The input format of a generated row (its group in ``write_demo_corpus``)."""
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("prompt", "prompt_response")):
        if key in row:
            return fmt
    return "alpaca"


def write_demo_corpus(out_dir: str | Path, n: int = 600, seed: int = 0) -> list[Path]:
    """Write the demo corpus as one JSONL file per input format; return the paths (sorted)."""
    from spice_ray.storage import Store

    out = Path(out_dir)
    store = Store(str(out))
    groups: dict[str, list[dict]] = {}
    for row in generate_demo_corpus(n=n, seed=seed):
        groups.setdefault(row_format(row), []).append(row)
    paths = []
    for fmt in sorted(groups):
        store.write_text(f"demo_{fmt}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in groups[fmt]))
        paths.append(out / f"demo_{fmt}.jsonl")
    logger.info("wrote demo corpus: %d rows in %d files under %s", n, len(paths), out)
    return paths
