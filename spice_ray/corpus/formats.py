"""Normalisation of one raw input row into the canonical chat form, and its content uid.

Canonical form: ``messages = [{"role": r, "content": c}, ...]`` with ``r`` in
{system, user, assistant}: at most one system turn, first; then user and assistant turns
alternating, starting with user and ending with assistant. Content strings are kept exactly as
given (no stripping); only empty system turns are dropped.

Accepted input formats (``fmt="auto"`` detects per row, in this order of precedence):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}``; authoritative when present, even if the
  row also has instruction/output (the LIMA records in the shared data are like that).
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}``, ``from`` in human/user → user,
  gpt/assistant/chatgpt/model → assistant, system → system; an optional top-level ``system`` string.
- ``prompt_response``: ``{"prompt", "response"}``, optional ``system``.
- ``alpaca``: ``{"instruction", "input"?, "output"}``, optional ``system``; the user turn is the
  instruction, or ``instruction + "\\n\\n" + input`` when the input is not blank.

A field whose value is ``None`` counts as absent (Parquet files with a union schema hold nulls).
A text is empty when nothing in it is visible (:func:`is_blank`): only whitespace, zero-width and
other format characters (U+200B, U+200C, U+200D, U+2060, U+FEFF, soft hyphen: category Cf), control
characters (Cc), space separators (Zs/Zl/Zp), variation selectors and the Hangul / braille fillers.
Every problem raises :class:`RowError` with a short reason code (see ``REASONS``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from typing import Any, Literal

logger = logging.getLogger(__name__)

Format = Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}

ROW_FIELDS = frozenset({"messages", "conversations", "prompt", "response", "instruction", "output"})
# Characters that show nothing besides the categories below: combining grapheme joiner, Khmer
# inherent vowels, Hangul fillers, braille blank, variation selectors.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_INVISIBLE = frozenset(
    "\u034f\u17b4\u17b5\u115f\u1160\u3164\uffa0\u2800"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)

REASONS = {
    "not_object": "the row is not a JSON object",
    "missing_field": "a required field is absent (or null)",
    "wrong_type": "a field has the wrong type (e.g. non-string content, messages not a list)",
    "empty_instruction": "the instruction / prompt / a user turn is empty, whitespace or invisible characters only",
    "empty_response": "the output / response / an assistant turn is empty, whitespace or invisible characters only",
    "empty_chat": "messages / conversations is an empty list",
    "unknown_role": "a chat turn has a role outside system/user/assistant (or the ShareGPT aliases)",
    "bad_turn_order": "system not first, or user/assistant turns not alternating from user",
    "no_assistant_turn": "a chat without any assistant turn",
    "last_turn_not_assistant": "a chat that does not end with an assistant turn",
    "nul_byte": "a text contains a NUL character",
    "invalid_unicode": "a text is not encodable as UTF-8 (lone surrogate escapes)",
}


class RowError(ValueError):
    """A row that cannot be normalised: ``reason`` is a short code from ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: empty, whitespace, or only invisible characters (see the
    module doc). Stops at the first visible character."""
    return all(c in _INVISIBLE or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text.strip())


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def detect_format(row: dict) -> str:
    """The input format of ``row``: messages > conversations > prompt/response > instruction/output."""
    if _present(row, "messages"):
        return "messages"
    if _present(row, "conversations"):
        return "sharegpt"
    if _present(row, "prompt") or _present(row, "response"):
        return "prompt_response"
    if _present(row, "instruction") or _present(row, "output"):
        return "alpaca"
    raise RowError(
        "missing_field", "no messages, conversations, prompt/response or instruction/output field"
    )


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise RowError("wrong_type", f"{where} is {type(text).__name__}, expected a string")
    if "\x00" in text:
        raise RowError("nul_byte", f"{where} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("invalid_unicode", f"{where}: {e.reason} at {e.start}") from None
    return text


def _required(row: dict, key: str) -> str:
    if not _present(row, key):
        raise RowError("missing_field", f"field {key!r} is missing")
    return _check_text(row[key], key)


def _system(row: dict) -> list[dict[str, str]]:
    """The optional top-level ``system`` string as a leading turn (none when absent or blank)."""
    if not _present(row, "system"):
        return []
    text = _check_text(row["system"], "system")
    return [] if is_blank(text) else [{"role": "system", "content": text}]


def _two_turn(system: list[dict[str, str]], user: str, assistant: str, user_key: str, out_key: str):
    if is_blank(user):
        raise RowError("empty_instruction", f"{user_key} is empty")
    if is_blank(assistant):
        raise RowError("empty_response", f"{out_key} is empty")
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _from_alpaca(row: dict) -> list[dict[str, str]]:
    instruction = _required(row, "instruction")
    output = _required(row, "output")
    extra = _check_text(row["input"], "input") if _present(row, "input") else ""
    user = instruction if is_blank(extra) else instruction + "\n\n" + extra
    if is_blank(instruction):
        raise RowError("empty_instruction", "instruction is empty")
    return _two_turn(_system(row), user, output, "instruction", "output")


def _from_prompt_response(row: dict) -> list[dict[str, str]]:
    prompt = _required(row, "prompt")
    response = _required(row, "response")
    return _two_turn(_system(row), prompt, response, "prompt", "response")


def _turns(items: Any, key: str, role_key: str, text_key: str, aliases: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise RowError("wrong_type", f"{key} is {type(items).__name__}, expected a list")
    if not items:
        raise RowError("empty_chat", f"{key} is empty")
    turns = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise RowError("wrong_type", f"{where} is {type(item).__name__}, expected an object")
        for k in (role_key, text_key):
            if item.get(k) is None:
                raise RowError("missing_field", f"{where} has no {k!r}")
        role = item[role_key]
        if not isinstance(role, str):
            raise RowError("wrong_type", f"{where}.{role_key} is {type(role).__name__}, expected a string")
        if role not in aliases:
            raise RowError("unknown_role", f"{where}.{role_key} is {role[:40]!r}")
        turns.append({"role": aliases[role], "content": _check_text(item[text_key], f"{where}.{text_key}")})
    return turns


def validate_chat(turns: list[dict[str, str]], key: str = "messages") -> list[dict[str, str]]:
    """Check turn order and emptiness of already-typed turns; drop empty system turns."""
    out = []
    for i, turn in enumerate(turns):
        role, content = turn["role"], turn["content"]
        if role == "system":
            if i != 0:
                raise RowError("bad_turn_order", f"{key}[{i}] is a system turn after the first turn")
            if is_blank(content):
                continue
        elif is_blank(content):
            reason = "empty_instruction" if role == "user" else "empty_response"
            raise RowError(reason, f"{key}[{i}] ({role}) is empty")
        out.append({"role": role, "content": content})
    dialog = [t["role"] for t in out if t["role"] != "system"]
    if "assistant" not in dialog:
        raise RowError("no_assistant_turn", f"{key} has no assistant turn")
    if dialog[-1] != "assistant":
        raise RowError("last_turn_not_assistant", f"{key} ends with a {dialog[-1]} turn")
    for j, role in enumerate(dialog):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise RowError("bad_turn_order", f"turn {j} of the dialog is {role}, expected {expected}")
    return out


def _from_messages(row: dict) -> list[dict[str, str]]:
    if not _present(row, "messages"):
        raise RowError("missing_field", "field 'messages' is missing")
    return validate_chat(_turns(row["messages"], "messages", "role", "content", {r: r for r in ROLES}))


def _from_sharegpt(row: dict) -> list[dict[str, str]]:
    if not _present(row, "conversations"):
        raise RowError("missing_field", "field 'conversations' is missing")
    turns = _turns(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    if turns[0]["role"] != "system":
        turns = _system(row) + turns
    return validate_chat(turns, "conversations")


_PARSERS = {
    "alpaca": _from_alpaca,
    "prompt_response": _from_prompt_response,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
}


def normalize_row(row: Any, fmt: Format = "auto") -> list[dict[str, str]]:
    """The canonical ``messages`` of one raw row; raises :class:`RowError` when it has none."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is {type(row).__name__}, expected an object")
    if fmt == "auto":
        fmt = detect_format(row)  # type: ignore[assignment]
    if fmt not in _PARSERS:
        raise ValueError(f"unknown corpus format {fmt!r}; known: auto, {', '.join(_PARSERS)}")
    return _PARSERS[fmt](row)


def canonical_json(messages: list[dict[str, str]]) -> str:
    """The canonical JSON text of ``messages`` (role and content only, sorted keys, no whitespace,
    non-ASCII kept as is)."""
    content = [{"role": m["role"], "content": m["content"]} for m in messages]
    return json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_uid(messages: list[dict[str, str]]) -> str:
    """sha256 hex of the canonical JSON of ``messages``: content only, not source or file."""
    return hashlib.sha256(canonical_json(messages).encode("utf-8")).hexdigest()
