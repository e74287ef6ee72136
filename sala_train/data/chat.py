"""Chat templates to token ids and loss labels: the heart of SFT.

Every assistant turn is trained in one forward pass, including its end-of-turn token; system
and user turns, role headers and the template's glue between turns are not. Spans come from the
tokenizer's own chat template: render successive prefixes and diff them. A template that is not
prefix-stable (one that rewrites earlier turns when a later one is added) is refused rather than
guessed at.

Each segment is tokenized on its own and the ids concatenated, so the prompt part of every turn
is tokenized exactly as at inference time (prompt rendered with the generation header, then the
model generates the reply).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sala_train.errors import DataError

IGNORE_INDEX = -100


class TemplateError(DataError):
    """The tokenizer's chat template cannot be split into trained and untrained spans safely."""


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def end_of_turn_markers(tokenizer: Any) -> list[str]:
    """Special tokens that can close an assistant turn: eos first, then the other specials."""
    markers = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in tokenizer.all_special_tokens:
        if token not in markers and token != tokenizer.pad_token:
            markers.append(token)
    return markers


def _split_assistant(segment: str, content: str, markers: list[str]) -> int:
    """Length of the trained part of an assistant segment: up to and including its end-of-turn."""
    body = content.strip()
    start = segment.find(body) if body else 0
    if start < 0:
        raise TemplateError("the chat template does not render assistant content verbatim; cannot locate the reply")
    search_from = start + len(body)
    hits = [(segment.find(m, search_from), m) for m in markers if segment.find(m, search_from) >= 0]
    if not hits:
        raise TemplateError(
            "the chat template puts no end-of-turn token after an assistant reply, so the model could "
            "never learn to stop; use a tokenizer whose template closes turns (e.g. <|im_end|>)"
        )
    pos, marker = min(hits)
    return pos + len(marker)


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[Segment]:
    """Split the rendered conversation into trained and untrained text, in order."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template; messages data needs one")
    markers = end_of_turn_markers(tokenizer)
    out: list[Segment] = []
    done = ""  # rendered text already assigned to segments
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering a longer conversation changes "
                "earlier text), so trained spans cannot be found safely"
            )
        reply = upto[len(prompt) :]
        cut = _split_assistant(reply, msg["content"], markers)
        out += [Segment(prompt[len(done) :], False), Segment(reply[:cut], True), Segment(reply[cut:], False)]
        done = upto
    full = _render(tokenizer, messages, generation_prompt=False)
    if not full.startswith(done):
        raise TemplateError("the chat template is not prefix-stable; trained spans cannot be found safely")
    out.append(Segment(full[len(done) :], False))
    return [s for s in out if s.text]


def encode(tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int) -> Encoded:
    """Token ids and labels (IGNORE_INDEX where no loss), cut to ``cutoff_len`` tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    for seg in segments(tokenizer, messages):
        ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if seg.trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > cutoff_len
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], truncated)
