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


def encode(
    tokenizer: Any,
    messages: list[dict[str, str]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Encoded:
    """Token ids and labels (IGNORE_INDEX where no loss), cut to ``cutoff_len`` tokens.

    ``mask_history``: only the last assistant turn is trained. ``train_on_prompt``: every token
    is trained (with ``mask_history``: everything up to the end of the last reply).
    """
    parts = segments(tokenizer, messages)
    last_reply = max(i for i, seg in enumerate(parts) if seg.trained)
    input_ids: list[int] = []
    labels: list[int] = []
    for i, seg in enumerate(parts):
        trained = seg.trained and (not mask_history or i == last_reply)
        if train_on_prompt:
            trained = i <= last_reply if mask_history else True
        ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > cutoff_len
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], truncated)


def prompt_and_reply(tokenizer: Any, prompt: list[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
    """Ids of a prompt (ending with its generation header) and of one reply with its end-of-turn.

    Built from the same segments as SFT, so DPO and KTO see exactly the tokens SFT trains on.
    """
    parts = segments(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
    last_reply = max(i for i, seg in enumerate(parts) if seg.trained)
    prompt_ids: list[int] = []
    for seg in parts[:last_reply]:
        prompt_ids += tokenizer(seg.text, add_special_tokens=False)["input_ids"]
    return prompt_ids, tokenizer(parts[last_reply].text, add_special_tokens=False)["input_ids"]


def render_document(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A whole conversation as one text (continual pre-training on chat data)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template; set dataset.template=chatml or cpm4")
    return _render(tokenizer, messages, generation_prompt=False)


_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {
    "chatml": _CHATML,
    # MiniCPM 4 (LLaMA-Factory's ``cpm4``): ChatML after the BOS token.
    "cpm4": "{{ bos_token }}" + _CHATML,
}


def use_named_template(tokenizer: Any, name: str) -> None:
    """Give ``tokenizer`` a named chat template; its turn markers must be single tokens of its vocabulary."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        raise TemplateError(f"dataset.template={name}: the tokenizer has no {' / '.join(missing)} token")
    if name == "cpm4" and tokenizer.bos_token is None:
        raise TemplateError("dataset.template=cpm4: the tokenizer has no BOS token")
    tokenizer.chat_template = NAMED_TEMPLATES[name]
    if "<|im_end|>" not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # an end-of-turn marker
