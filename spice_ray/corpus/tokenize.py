"""Tokenization of canonical chats, with the loss mask on the assistant turns.

Rendering: the tokenizer's chat template when ``tokenizer.chat_template`` is set, else the plain
template below (``PLAIN_TEMPLATE``): the tokenizer's bos_token (if any), then one block per turn::

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}{eos}\\n       (eos: the tokenizer's eos_token, or nothing)

The rendered text is tokenized once with ``add_special_tokens=False`` (templates carry their own
bos/eos). Loss mask (``loss_on="response"``): a token gets ``labels = input_ids`` when its character
span overlaps an assistant turn's content, and also the end-of-turn special token that follows the
content (e.g. ``<|im_end|>``, ``</s>``; whitespace-only tokens in between are labelled with it);
every other token gets -100. ``loss_on="all"`` labels every token. Labels are aligned with
``input_ids`` (the model shifts them), as Hugging Face causal LMs expect.

Assistant spans are found from prefixes: ``template(messages[:i], add_generation_prompt=True)`` must
be a prefix of the full text, and turn ``i``'s content starts right where it ends (templates that
``trim`` the content are handled by a search for the stripped content there). Templates for which
that fails fall back to an in-order search of every turn's content. Token spans come from the fast
tokenizer's offset mapping, so ``encode`` needs a fast tokenizer; ``count_tokens`` does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The plain template: the text is {bos} followed by one block per turn (``str.format`` fields).
PLAIN_TEMPLATE: dict[str, str] = {
    "system": "<|system|>\n{content}\n",
    "user": "<|user|>\n{content}\n",
    "assistant": "<|assistant|>\n{content}{eos}\n",
}

Messages = Sequence[dict[str, Any]]


class EncodeError(ValueError):
    """A chat that cannot be rendered or masked with this tokenizer."""


@dataclass
class Encoded:
    """One tokenized record: ``labels`` is -100 where no loss is taken; ``n_tokens = len(input_ids)``."""

    input_ids: list[int]
    labels: list[int]
    n_tokens: int
    truncated: bool = False

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _plain_render(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = [bos]
    pos = len(bos)
    spans = []
    for m in messages:
        if m["role"] not in PLAIN_TEMPLATE:
            raise EncodeError(f"role {m['role']!r} is not one of {sorted(PLAIN_TEMPLATE)}")
        # split the block around {content} so the content's span is known exactly
        head, tail = PLAIN_TEMPLATE[m["role"]].split("{content}")
        head, tail = head.format(eos=eos), tail.format(eos=eos)
        content = m["content"]
        start = pos + len(head)
        parts += [head, content, tail]
        pos = start + len(content) + len(tail)
        if m["role"] == "assistant":
            spans.append((start, start + len(content)))
    return "".join(parts), spans


def _template(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(role=m["role"], content=m["content"]) for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )


def render_text(tokenizer: Any, messages: Messages) -> str:
    """The full text of ``messages`` as the model sees it (chat template or ``PLAIN_TEMPLATE``)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return _template(tokenizer, messages, False)
        except Exception as e:  # jinja raise_exception, bad roles, ...
            raise EncodeError(f"chat template failed: {e}") from e
    return _plain_render(tokenizer, messages)[0]


def _find(full: str, content: str, start: int) -> tuple[int, int] | None:
    """Span of ``content`` in ``full`` at or after ``start`` (or of its stripped form)."""
    for text in (content, content.strip()):
        if text:
            j = full.find(text, start)
            if j >= 0:
                return j, j + len(text)
    return None


def render_with_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character span ``[start, end)`` of every assistant turn's content."""
    if not getattr(tokenizer, "chat_template", None):
        return _plain_render(tokenizer, messages)
    full = render_text(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0  # lower bound for the in-order search
    last_end = 0  # end of the previous assistant span
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            found = _find(full, content, cursor)
            if found is not None:  # a template may drop or rewrite system turns: then keep the cursor
                cursor = found[1]
            continue
        span = None
        try:
            prefix = _template(tokenizer, messages[:i], True) if i > 0 else ""
        except Exception:
            prefix = None
        if prefix is not None and full.startswith(prefix) and len(prefix) >= last_end:
            if full.startswith(content, len(prefix)):
                span = (len(prefix), len(prefix) + len(content))
            else:
                span = _find(full, content, len(prefix))
        if span is None:
            span = _find(full, content, max(cursor, last_end))
        if span is None:
            raise EncodeError(f"assistant turn {i} not found in the text the chat template rendered")
        spans.append(span)
        cursor = last_end = span[1]
    return full, spans


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _labels(
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    special: set[int],
) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    t = 0
    for start, end in spans:
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        last = None
        while t < len(ids) and offsets[t][0] < end:
            if offsets[t][1] > start:  # overlaps the content
                labels[t] = ids[t]
                last = t
            t += 1
        if last is None:
            continue
        # the end-of-turn special token right after the content (whitespace tokens in between)
        k = t
        while k < len(ids) and k - t < 3 and ids[k] not in special and not text[offsets[k][0] : offsets[k][1]].strip():
            k += 1
        if k < len(ids) and ids[k] in special:
            for j in range(t, k + 1):
                labels[j] = ids[j]
            t = k + 1
    return labels


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise EncodeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the loss mask needs its offset mapping "
            "(load the tokenizer with use_fast=True / a tokenizer.json)"
        )


def encode_batch(
    tokenizer: Any,
    batch: Sequence[Messages],
    *,
    max_tokens: int | None = None,
    loss_on: Literal["response", "all"] = "response",
) -> list[Encoded]:
    """:func:`encode` for many chats with one tokenizer call."""
    if loss_on not in ("response", "all"):
        raise ValueError(f"loss_on must be 'response' or 'all', got {loss_on!r}")
    _check_fast(tokenizer)
    rendered = [render_with_spans(tokenizer, messages) for messages in batch]
    if not rendered:
        return []
    enc = tokenizer(  # a fast tokenizer (checked above) always gives offsets
        [text for text, _ in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    special = _special_ids(tokenizer)
    out = []
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids = list(ids)
        labels = list(ids) if loss_on == "all" else _labels(text, ids, [tuple(o) for o in offsets], spans, special)
        truncated = max_tokens is not None and len(ids) > max_tokens
        if truncated:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        out.append(Encoded(input_ids=ids, labels=labels, n_tokens=len(ids), truncated=truncated))
    return out


def encode(
    tokenizer: Any,
    messages: Messages,
    *,
    max_tokens: int | None = None,
    loss_on: Literal["response", "all"] = "response",
) -> Encoded:
    """Token ids and labels of one chat; truncated to the first ``max_tokens`` tokens when longer."""
    return encode_batch(tokenizer, [messages], max_tokens=max_tokens, loss_on=loss_on)[0]


def count_text_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token counts of already rendered texts (one batched tokenizer call, no special tokens added)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and not backend.encode_special_tokens
        and not getattr(tokenizer, "split_special_tokens", False)
    ):
        # the Rust tokenizer without offsets: what __call__ does, several times faster on long texts
        return [len(e.ids) for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)
    return [len(ids) for ids in enc["input_ids"]]


# config.json keys that hold a causal LM's context length (positions), in order of preference.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Hugging Face sets model_max_length to int(1e30) when a tokenizer does not know its model's context.
_UNKNOWN_LENGTH = 10**9


@dataclass(frozen=True)
class ModelContext:
    """How many token positions the model has (``positions``) and where that was read (``source``)."""

    positions: int
    source: str


def _config_context(config: dict[str, Any]) -> tuple[str, int] | None:
    """``(key, positions)`` of the first ``CONTEXT_KEYS`` entry of a model config (or its
    ``text_config``) that holds a positive integer."""
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("cannot read the model context from %s: %s", path, e)
        return {}
    return config if isinstance(config, dict) else {}


def model_context(tokenizer: Any) -> ModelContext | None:
    """The context length of the model ``tokenizer`` belongs to: ``max_position_embeddings`` (or
    the like, see ``CONTEXT_KEYS``) of the ``config.json`` beside the tokenizer's files, else the
    tokenizer's own ``model_max_length`` when it sets one; None when neither says."""
    folder = str(getattr(tokenizer, "name_or_path", "") or "")
    config = Path(folder) / "config.json"
    if folder and config.is_file():
        found = _config_context(_read_config(config))
        if found is not None:
            return ModelContext(found[1], f"{found[0]} in {config}")
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _UNKNOWN_LENGTH:
        return ModelContext(length, "the tokenizer's model_max_length")
    return None


def effective_max_tokens(max_tokens: int, context: ModelContext | None) -> int:
    """``min(max_tokens, context.positions)``: no row is kept longer than the model can read; a
    one-line warning when the model's context caps ``max_tokens``."""
    if context is None or context.positions >= max_tokens:
        return max_tokens
    logger.warning(
        "corpus.max_tokens=%d is over the model context (%d positions, %s): capped to %d tokens",
        max_tokens, context.positions, context.source, context.positions,
    )
    return context.positions


def count_tokens(tokenizer: Any, messages: Messages) -> int:
    """Tokens in the full rendered chat: the same count ``encode`` gives before truncation."""
    return count_text_tokens(tokenizer, [render_text(tokenizer, messages)])[0]


def pad_batch(encodeds: Sequence[Encoded], pad_id: int | None, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (pad_id), ``labels`` (-100 on padding) and ``attention_mask``, all
    ``width`` wide (default: the longest record; a smaller ``width`` is an error)."""
    if not encodeds:
        raise ValueError("pad_batch needs at least one record")
    if pad_id is None:
        raise ValueError("pad_batch needs a pad id (the tokenizer has no pad_token)")
    longest = max(len(e.input_ids) for e in encodeds)
    if width is None:
        width = longest
    elif width < longest:
        raise ValueError(f"pad_batch width {width} is shorter than the longest record ({longest} tokens)")
    import torch

    input_ids = torch.full((len(encodeds), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encodeds), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encodeds), width), dtype=torch.long)
    for i, e in enumerate(encodeds):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
