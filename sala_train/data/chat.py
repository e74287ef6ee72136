"""Chat templates to token ids and loss labels: the heart of SFT.

Every assistant turn is trained in one forward pass, including its end-of-turn token; system
and user turns, role headers and the template's glue between turns are not. Spans come from the
tokenizer's own chat template: render successive prefixes and diff them. A template that is not
prefix-stable (one that rewrites earlier turns when a later one is added) is refused rather than
guessed at.

The whole conversation is tokenized at once and each token goes to the segment its characters
are in (the tokenizer's offsets), with a hard cut at each reply's start, where inference stops
tokenizing the prompt and starts generating. Segments tokenized one by one gave each reply of a
SentencePiece-style tokenizer (a "▁" word marker) its own leading "▁": the model learnt to start
replies with a space inference never shows it. (TRL's assistant-only loss masks by character
spans of the whole text too.) DPO and KTO prompts are the prompt alone, the same ids whatever reply
follows.

Tool use: an assistant turn that calls functions is trained like any reply (the call and its
end-of-turn token); tool results are not. The template must render the calls, the results and the
offered tools; one that drops any of them is refused, since it would train on empty turns.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sala_train.errors import DataError

IGNORE_INDEX = -100


class TemplateError(DataError):
    """The tokenizer's chat template cannot be split into trained and untrained spans safely."""


class _NoEndOfTurn(TemplateError):
    """No special token follows an assistant reply, whose rest (``after``) ``segments`` looks in for
    an end-of-turn token the tokenizer does not mark special."""

    def __init__(self, after: str):
        super().__init__(
            "the chat template puts no end-of-turn token after an assistant reply, so the model could "
            "never learn to stop; use a tokenizer whose template closes turns (e.g. <|im_end|>)"
        )
        self.after = after


class _NotVerbatim(TemplateError):
    """The template rewrites a reply's text (``segments`` says which conversation, as a record's problem)."""


class TemplateRenderError(TemplateError):
    """The chat template raised on one conversation (it refuses its turns, or fails on its values):
    a problem of that record, which ``dataset.on_error=skip`` drops."""


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
        return loss_terms(self.labels)


def loss_terms(labels: list[int]) -> int:
    """The tokens a sequence's labels train: a sequence's first token is never a target (nothing
    before it predicts it)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def template_messages(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Canonical messages in the form chat templates expect (HF's ``tool_calls`` of ``function``s)."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        rendered: dict[str, Any] = {"role": msg["role"], "content": msg["content"]}
        if msg.get("tool_calls"):
            rendered["tool_calls"] = [{"type": "function", "function": c} for c in json.loads(msg["tool_calls"])]
        out.append(rendered)
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, tools: str = "") -> str:
    from jinja2 import TemplateError as JinjaError
    from jinja2 import TemplateSyntaxError

    try:
        return str(
            tokenizer.apply_chat_template(
                template_messages(messages),
                tools=json.loads(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message}); fix the tokenizer's template "
            "or replace it (dataset.template=chatml or cpm4)"
        ) from exc
    # raise_exception() on turns it refuses, or a Python error on the values it was given
    except (JinjaError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        roles = ", ".join(m["role"] for m in messages)
        begins = messages[0]["content"][:60] if messages else ""
        why = exc.message if isinstance(exc, JinjaError) else f"{type(exc).__name__}: {exc}"
        raise TemplateRenderError(
            f"the chat template failed on the turns [{roles}] of the conversation beginning {begins!r}: {why}; "
            "fix the tokenizer's template or replace it (dataset.template=chatml or cpm4), or set "
            "dataset.on_error=skip to leave such conversations out"
        ) from exc


def _call_names(msg: dict[str, str]) -> list[str]:
    return [call["name"] for call in json.loads(msg["tool_calls"])] if msg.get("tool_calls") else []


_NO_TOOL_SUPPORT = "; set dataset.template=chatml (or cpm4), which renders tools, calls and results"


def end_of_turn_markers(tokenizer: Any) -> list[str]:
    """Special tokens that can close an assistant turn: eos first, then the other specials, those
    marked special among the added tokens too (Meta's Llama-3 tokenizers list <|eot_id|> there
    alone), and the pad token last (a fine-tune's pad is often the end-of-turn token)."""
    state = (len(tokenizer), tokenizer.eos_token, tokenizer.pad_token, tuple(tokenizer.all_special_tokens))
    kept = _MARKERS.get(id(tokenizer))
    if kept is not None and kept[0] == state:
        return kept[1]
    # (tokenizers builds added_tokens_decoder anew at each read: 28 ms a read for 6,000 special tokens)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = (t.content for t in added.values() if getattr(t, "special", False))
    ordered = dict.fromkeys([tokenizer.eos_token, *tokenizer.all_special_tokens, *specials, tokenizer.pad_token])
    markers = [token for token in ordered if token]  # (a dict: Mistral's Tekken marks 1,000 tokens special)
    _MARKERS[id(tokenizer)] = (state, markers)
    return markers


# end_of_turn_markers' list per tokenizer (by id, with the state it was built from: a tokenizer
# given tokens or another eos or pad since builds it again).
_MARKERS: dict[int, tuple[tuple[Any, ...], list[str]]] = {}


def _unmarked_end(tokenizer: Any, segment: str) -> str:
    """A token of the tokenizer's added vocabulary, not marked special, in ``segment``, what follows
    the reply (the end-of-turn token the template writes, unmarked), said in the refusal."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = sorted((segment.find(t.content), t.content) for t in added.values()
                   if not getattr(t, "special", False) and t.content and t.content in segment)  # fmt: skip
    if not found:
        return ""
    token = found[0][1]
    return (f" ({token} follows the reply, but is not a special token of the tokenizer: mark it special in its "
            f"tokenizer_config.json's added_tokens_decoder, or set dataset.template=chatml)")  # fmt: skip


def _plain_reply_end(tokenizer: Any, markers: list[str], system: bool = False) -> str | None:
    """The special token the template closes a plain assistant reply with (probed after a system
    turn too, for a template that refuses a conversation without one)."""
    probe = [{"role": "system", "content": "Be brief.", "tool_calls": ""}] if system else []
    probe.append({"role": "user", "content": "Hi", "tool_calls": ""})
    prompt = _render(tokenizer, probe, generation_prompt=True)
    reply = _render(tokenizer, [*probe, {"role": "assistant", "content": "Hello.", "tool_calls": ""}], False)
    after = reply.find("Hello.", len(prompt)) + len("Hello.")
    hit = _first_marker(reply, markers, after)
    return hit[1] if hit else None


def _first_marker(text: str, markers: list[str], start: int) -> tuple[int, str] | None:
    """The first of ``markers`` in ``text`` from ``start`` (its position), by one compiled search:
    a find per marker took 1.9 ms a reply for a tokenizer that marks 6,000 tokens special (0.02 ms)."""
    found = _markers_pattern(tuple(markers)).search(text, start) if markers else None
    return (found.start(), found.group()) if found else None


@functools.lru_cache(maxsize=8)
def _markers_pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    # (longest first: of two markers at one place, one the other's prefix, the whole one)
    return re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))


def reply_end_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's chat template closes an assistant reply with, which SFT,
    DPO and KTO train the model to write (None without a template, or for one that closes replies
    with no special token). TemplateError when the template refuses both probes (with and without
    a system turn)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    markers = end_of_turn_markers(tokenizer)
    try:
        return _plain_reply_end(tokenizer, markers)
    except TemplateError:
        return _plain_reply_end(tokenizer, markers, system=True)


# Stands in for a reply's text to learn where the template writes it: no blank or markup a
# template would trim or parse, and unlike any text a template's own framing holds.
REPLY_SENTINEL = "SalaReplyGoesHere7f3a9c"


def _split_assistant(
    segment: str, msg: dict[str, str], markers: list[str], rendered_with: Callable[[str], str] | None = None
) -> int:
    """Length of the trained part of an assistant segment: up to and including its end-of-turn
    (the first one after the reply's text and the names of the functions it calls).
    ``rendered_with(text)``: the same segment with ``text`` as the reply's content."""
    body = msg["content"].strip()
    start = segment.find(body) if body else 0
    if body and segment.count(body) > 1:
        # The text occurs in the template's framing too (a reply "a" in "<|channel|>final<|message|>"):
        # the first match cut the reply before its text, untrained, without a word.
        start = _where_the_template_writes(segment, body, rendered_with)
    elif not body and not _call_names(msg):  # (a blank reply: its end is after the framing, not at its first special)
        start = max(_where_the_template_writes(segment, body, rendered_with), 0)
    if start < 0:
        raise _NotVerbatim(body)
    search_from = start + len(body)
    for name in _call_names(msg):
        found = segment.find(name, search_from)
        if found < 0:
            raise TemplateError(f"the chat template does not render tool calls (no '{name}' in the turn)"
                                + _NO_TOOL_SUPPORT)  # fmt: skip
        search_from = found + len(name)
    hit = _first_marker(segment, markers, search_from)
    if not hit:
        raise _NoEndOfTurn(segment[search_from:])
    pos, marker = hit
    return pos + len(marker)


def _where_the_template_writes(segment: str, body: str, rendered_with: Callable[[str], str] | None) -> int:
    """Where the reply's text starts in ``segment``, found by rendering a sentinel in its place
    (-1 when the template does not write the text there, verbatim)."""
    if rendered_with is None:
        return -1
    sentinel = rendered_with(REPLY_SENTINEL)
    at = sentinel.find(REPLY_SENTINEL)
    if at < 0 or segment[:at] != sentinel[:at]:
        return -1
    found = segment.find(body, at)
    return found if found >= 0 and not segment[at:found].strip() else -1  # (blanks the template kept)


def segments(tokenizer: Any, messages: list[dict[str, str]], tools: str = "") -> list[Segment]:
    """Split the rendered conversation into trained and untrained text, in order."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(
            "the tokenizer has no chat template, which messages data needs; set "
            "dataset.template=chatml or cpm4, or use a model whose tokenizer has one"
        )
    markers = end_of_turn_markers(tokenizer)
    call_markers: list[str] | None = None  # found once, at the first call turn
    out: list[Segment] = []
    done = ""  # rendered text already assigned to segments
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering a longer conversation changes "
                "earlier text), so trained spans cannot be found safely"
            )
        for result in (m["content"] for m in messages[:i] if m["role"] == "tool"):
            if result.strip() not in prompt and json.dumps(result, ensure_ascii=False) not in prompt:
                raise TemplateError("the chat template does not render tool results (role tool)" + _NO_TOOL_SUPPORT)
        reply = upto[len(prompt) :]
        turn_markers = markers
        if msg.get("tool_calls"):  # call delimiters may be special tokens too: a call ends as plain replies do
            if call_markers is None:
                end = _plain_reply_end(tokenizer, markers)
                call_markers = [m for m in markers if m == end]
            turn_markers = call_markers

        def rendered_with(text: str, i: int = i, msg: dict[str, str] = msg, prompt: str = prompt) -> str:
            return _render(tokenizer, [*messages[:i], {**msg, "content": text}], False, tools)[len(prompt) :]

        try:
            cut = _split_assistant(reply, msg, turn_markers, rendered_with)
        except _NoEndOfTurn as exc:
            raise TemplateError(f"{exc}{_unmarked_end(tokenizer, exc.after)}") from None
        except _NotVerbatim as exc:  # (Qwen3's rewrites a reply's <think> block; the next record may pass)
            begins = messages[0]["content"][:60] if messages else ""
            raise TemplateRenderError(
                f"the chat template does not write the reply beginning {str(exc)[:60]!r} as given (it rewrites it), "
                f"so the reply cannot be located, in the conversation beginning {begins!r}; replace the template "
                "(dataset.template=chatml or cpm4), or set dataset.on_error=skip to leave such conversations out"
            ) from None
        out += [Segment(prompt[len(done) :], False), Segment(reply[:cut], True), Segment(reply[cut:], False)]
        done = upto
    full = _render(tokenizer, messages, generation_prompt=False, tools=tools)
    if not full.startswith(done):
        raise TemplateError("the chat template is not prefix-stable; trained spans cannot be found safely")
    if tools and full == _render(tokenizer, messages, generation_prompt=False):
        raise TemplateError("the chat template does not render the offered tools (dataset.columns.tools)"
                            + _NO_TOOL_SUPPORT)  # fmt: skip
    out.append(Segment(full[len(done) :], False))
    return [s for s in out if s.text]


def encode(
    tokenizer: Any,
    messages: list[dict[str, str]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    tools: str = "",
) -> Encoded:
    """Token ids and labels (IGNORE_INDEX where no loss), cut to ``cutoff_len`` tokens.

    ``mask_history``: only the last assistant turn is trained; a conversation too long for
    ``cutoff_len`` loses its earliest exchanges (user turn to the next user turn; the system prompt
    stays) until it fits, rather than the reply it trains on. ``train_on_prompt``: every token is
    trained (the two exclude each other; the config check refuses both). ``tools``: the function
    schemas offered, as canonical JSON text (see ``records``).
    """
    encoded = _encode_whole(tokenizer, messages, cutoff_len, train_on_prompt, mask_history, tools)
    if mask_history and encoded.truncated:
        start = 1 if messages[0]["role"] == "system" else 0
        for later in [i for i, msg in enumerate(messages) if msg["role"] == "user"][1:]:
            shorter = _encode_whole(tokenizer, messages[:start] + messages[later:], cutoff_len, False, True, tools)
            encoded = Encoded(shorter.input_ids, shorter.labels, truncated=True)  # counted as cut: history went
            if not shorter.truncated:
                break
    return encoded


def _encode_whole(
    tokenizer: Any, messages: list[dict[str, str]], cutoff_len: int, train_on_prompt: bool, mask_history: bool,
    tools: str,
) -> Encoded:  # fmt: skip
    parts = segments(tokenizer, messages, tools)
    last_reply = max(i for i, seg in enumerate(parts) if seg.trained)
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (seg, ids) in enumerate(zip(parts, _ids_by_segment(tokenizer, parts), strict=True)):
        trained = train_on_prompt or (seg.trained and (not mask_history or i == last_reply))
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > cutoff_len
    return Encoded(input_ids[:cutoff_len], labels[:cutoff_len], truncated)


def prompt_and_reply(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    reply: dict[str, str],
    tools: str = "",
    prompts_seen: dict[str, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Ids of a prompt (ending with its generation header) and of one reply (an assistant message:
    text and/or tool calls) with its end-of-turn; ``tools``: the schemas offered, as for SFT;
    ``prompts_seen``: prompt texts already tokenized, by the pair's other reply (a DPO prompt was
    tokenized once a reply, a tenth of tokenizing a preference set).

    Built from the same segments as SFT, so DPO and KTO see exactly the tokens SFT trains on.
    """
    parts = segments(tokenizer, [*prompt, reply], tools)
    last_reply = max(i for i, seg in enumerate(parts) if seg.trained)
    # The prompt alone, as inference tokenizes it: the same ids whatever reply follows (chosen
    # and rejected share them), and the reply as it tokenizes after it.
    prompt_text = "".join(seg.text for seg in parts[:last_reply])
    seen = {} if prompts_seen is None else prompts_seen
    if prompt_text not in seen:
        seen[prompt_text] = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return list(seen[prompt_text]), _ids_by_segment(tokenizer, parts)[last_reply]


def _ids_by_segment(tokenizer: Any, parts: list[Segment]) -> list[list[int]]:
    """Each segment's token ids, from one tokenization of the whole text (see the module's doc).

    Each reply's start is a hard cut, as at inference, where the prompt is tokenized on its own
    and generation starts after it: a token across it (a header's newline merged with a reply's
    leading newlines or indentation) is tokenized again as its two parts. A token across any other
    boundary goes to the segment it starts in (the reply, at its end). A tokenizer without offsets
    (a slow, Python one) tokenizes segment by segment.
    """
    if not getattr(tokenizer, "is_fast", False):
        return [tokenizer(seg.text, add_special_tokens=False)["input_ids"] for seg in parts]
    import numpy as np

    text = "".join(seg.text for seg in parts)
    starts = [0, *itertools.accumulate(len(seg.text) for seg in parts)][:-1]
    cuts = [start for start, seg in zip(starts, parts, strict=True) if seg.trained]
    ids, offsets = _whole_offsets(tokenizer, text)
    out: list[list[int]] = [[] for _ in parts]
    if not ids:
        return out
    # (numpy, not a loop over tokens: two per-token Python loops were 40% of tokenizing a data set)
    token_ids = np.asarray(ids, dtype=np.int64)
    # (from an iterator: np.asarray of a list of pairs took twice as long)
    spans = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
    segment_of = np.searchsorted(np.asarray(starts), spans[:, 0], side="right") - 1
    done = 0  # tokens already placed
    for first, stop, start, end in _units_across(spans, cuts):
        _place(out, token_ids[done:first], segment_of[done:first])
        bounds = [start, *(cut for cut in cuts if start < cut < end), end]
        for a, b in itertools.pairwise(bounds):
            with _as_mid_text(tokenizer) if a > 0 else contextlib.nullcontext():
                out[bisect.bisect_right(starts, a) - 1] += tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        done = stop
    _place(out, token_ids[done:], segment_of[done:])
    return out


def _place(out: list[list[int]], token_ids: Any, segment_of: Any) -> None:
    """Each token appended to its segment's ids, in order."""
    import numpy as np

    for segment in np.unique(segment_of).tolist():
        out[segment] += token_ids[segment_of == segment].tolist()


def _units_across(spans: Any, cuts: list[int]) -> list[tuple[int, int, int, int]]:
    """The units a cut falls inside, each as (first token, token after its last, its first
    character, the character after its last). A unit is tokens grouped where they share a
    character: a byte-level BPE splits a character it has no token for (an emoji, a rare CJK
    character) into tokens that each span all of it. Cut apart, a character's bytes were
    re-tokenized with the cut token and then again with its neighbour."""
    import numpy as np

    if not cuts:
        return []
    first_char, end_char = spans[:, 0], spans[:, 1]
    reach = np.maximum.accumulate(end_char)  # the furthest character any token so far covers
    opens = np.ones(len(spans), dtype=bool)
    opens[1:] = first_char[1:] >= reach[:-1]  # a token starting inside an earlier one joins its unit
    unit_first = np.flatnonzero(opens)
    unit_stop = np.append(unit_first[1:], len(spans))
    unit_start, unit_end = first_char[unit_first], np.maximum.reduceat(end_char, unit_first)
    inside = np.zeros(len(unit_first), dtype=bool)
    for cut in cuts:
        inside |= (unit_start < cut) & (cut < unit_end)
    across = np.flatnonzero(inside).tolist()
    return [(int(unit_first[u]), int(unit_stop[u]), int(unit_start[u]), int(unit_end[u])) for u in across]


@contextlib.contextmanager
def _as_mid_text(tokenizer: Any) -> Iterator[None]:
    """While open, ``tokenizer`` tokenizes a text as the middle of a longer one would be: without
    the word marker a SentencePiece-style tokenizer puts before a text's first word (Metaspace's
    prepend_scheme; a Prepend normalizer, as Llama's and MiniCPM's tokenizer.json have) or the
    space of a byte-level add_prefix_space. A piece cut at a reply's start got it: the prompt's
    newline and the reply after it each trained a "▁" inference never puts there. The components
    are changed in place and put back, as ``_whole_offsets`` does with the post-processor."""
    from tokenizers import normalizers, pre_tokenizers

    neutral = ((pre_tokenizers.Metaspace, "prepend_scheme", "never"),
               (pre_tokenizers.ByteLevel, "add_prefix_space", False), (normalizers.Prepend, "prepend", ""))  # fmt: skip
    backend = getattr(tokenizer, "backend_tokenizer", None)
    undo: list[tuple[Any, str, Any]] = []
    try:
        if backend is not None:
            for component in (*_components(backend.pre_tokenizer), *_components(backend.normalizer)):
                for kind, attribute, value in neutral:
                    if isinstance(component, kind):
                        undo.append((component, attribute, getattr(component, attribute)))
                        setattr(component, attribute, value)
        yield
    finally:
        for component, attribute, value in reversed(undo):
            setattr(component, attribute, value)


def _components(component: Any) -> list[Any]:
    """A normalizer's or pre-tokenizer's parts, those of a Sequence (which holds them, shared) flattened."""
    from tokenizers import normalizers, pre_tokenizers

    if component is None:
        return []
    if not isinstance(component, pre_tokenizers.Sequence | normalizers.Sequence):
        return [component]
    parts: list[Any] = []
    for index in itertools.count():
        try:
            parts += _components(component[index])
        except IndexError:
            return parts
    return parts


def _whole_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s ids and each token's span as the text lies, blanks included. GPT-2-style
    tokenizers (ByteLevel or RoBERTa post-processing with trim_offsets) shrink a span to its
    non-blank characters, which hid a token across a reply's start ("\\n   " before an indented
    reply: the header's newline with the reply's indentation). Their post-processor only adds
    special tokens, which this call does not ask for, so it is set aside for the call (not a
    copy of the tokenizer: a copy misses tokens added later, holds memory, and cannot be made of
    one with a Python component) and put back."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    processor = backend.post_processor if backend is not None else None
    if processor is not None:
        backend.post_processor = None
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    finally:
        if processor is not None:
            backend.post_processor = processor
    return encoded["input_ids"], encoded["offset_mapping"]


def render_document(tokenizer: Any, messages: list[dict[str, str]], tools: str = "") -> str:
    """A whole conversation as one text (continual pre-training on chat data)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template; set dataset.template=chatml or cpm4")
    document = _render(tokenizer, messages, generation_prompt=False, tools=tools)
    for name in (name for msg in messages for name in _call_names(msg)):
        if name not in document:
            raise TemplateError(f"the chat template does not render tool calls (no '{name}')" + _NO_TOOL_SUPPORT)
    return document


# ChatML (LLaMA-Factory's ``chatml``; ``cpm4`` puts BOS first) with tools and calls written as
# LLaMA-Factory writes them, byte for byte: the guide trains tool calls with its ``template: cpm4``,
# and a model tuned there must meet the same tokens here (checked against LLaMA-Factory's own output
# in tests/fixtures/llamafactory_tool_renderings.json). As there, the tools text follows the system
# prompt without a separator. Jinja, not Python, because the template is saved with the tokenizer:
# the exported model renders tools for inference as it was trained.
_CHATML = r"""
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- endif -%}
  {{- tools_text(tools) ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if not (tools and loop.first and message['role'] == 'system') -%}
    {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ (message['content'] or '') -}}
    {%- if message['tool_calls'] -%}
      {{- ('\n' if message['content'] else '') ~ calls_text(message['tool_calls']) -}}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Each call of an assistant turn, one per line, written by the tool format's ``call_text``; the
# arguments as JSON text (inference callers may pass OpenAI's text as is).
_CALLS = r"""
{%- macro calls_text(calls) -%}
  {%- for call in calls -%}
    {%- set call = call['function'] if call['function'] is defined else call -%}
    {%- set args = call['arguments'] if call['arguments'] is string else call['arguments'] | tojson -%}
    {{- ('\n' if not loop.first else '') ~ call_text(call['name'], args) -}}
  {%- endfor -%}
{%- endmacro -%}
"""

# LLaMA-Factory's ``default`` tool format, the one its chatml and cpm4 templates use: each tool's
# arguments listed as text, calls as ``Action: <name>`` / ``Action Input: <arguments>`` lines.
_DEFAULT_TOOLS = r"""
{%- macro tools_text(tools) -%}
  {%- set names = namespace(all=[]) -%}
  {{- 'You have access to the following tools:\n' -}}
  {%- for tool in tools -%}
    {%- set fn = tool['function'] if tool['type'] == 'function' else tool -%}
    {%- set names.all = names.all + [fn['name']] -%}
    {{- '> Tool Name: ' ~ fn['name'] ~ '\nTool Description: ' -}}
    {{- (fn['description'] if fn['description'] is defined else '') ~ '\nTool Args:\n' -}}
    {%- set params = fn['parameters'] if fn['parameters'] else {} -%}
    {%- set required = params['required'] if params['required'] else [] -%}
    {%- for name, param in (params['properties'] if params['properties'] else {}).items() -%}
      {{- '  - ' ~ name ~ ' (' ~ (param['type'] if param['type'] is defined else '') -}}
      {{- (', required' if name in required else '') ~ '): ' -}}
      {{- param['description'] if param['description'] is defined else '' -}}
      {%- if param['enum'] -%}{{- ', should be one of [' ~ param['enum'] | join(', ') ~ ']' -}}{%- endif -%}
      {#- 'items' in param: a missing key would find the dict's items() method instead -#}
      {%- if 'items' in param and param['items'] -%}
        {{- ', where each item should be ' ~ (param['items']['type'] if param['items']['type'] is defined else '') -}}
      {%- endif -%}
      {{- '\n' -}}
    {%- endfor -%}
    {{- '\n' -}}
  {%- endfor -%}
  {{- 'Use the following format if using a tool:\n```\nAction: tool name (one of [' ~ names.all | join(', ') -}}
  {{- '])\nAction Input: the input to the tool, in a JSON format representing the kwargs ' -}}
  {{- '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n' -}}
{%- endmacro -%}
{%- macro call_text(name, args) -%}{{- 'Action: ' ~ name ~ '\nAction Input: ' ~ args -}}{%- endmacro -%}
"""

# LLaMA-Factory's ``qwen`` tool format (Qwen 2.5's, Hermes-style): the schemas as JSON lines in
# <tools>, each call as JSON in <tool_call> tags, as vLLM's ``hermes`` tool parser reads them.
_QWEN_TOOLS = r"""
{%- macro tools_text(tools) -%}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}
    {{- '\n' ~ (tool if tool['type'] == 'function' else {'type': 'function', 'function': tool}) | tojson -}}
  {%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
  {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endmacro -%}
{%- macro call_text(name, args) -%}
  {{- '<tool_call>\n{"name": ' ~ name | tojson ~ ', "arguments": ' ~ args ~ '}\n</tool_call>' -}}
{%- endmacro -%}
"""
TOOL_FORMATS = {"default": _DEFAULT_TOOLS, "qwen": _QWEN_TOOLS}


def named_template(name: str, tool_format: str = "default") -> str:
    """The Jinja source of ``dataset.template=name`` with tools in ``tool_format``."""
    bos = "{{- bos_token -}}" if name == "cpm4" else ""  # MiniCPM 4 (LLaMA-Factory's cpm4): BOS, then ChatML
    return (TOOL_FORMATS[tool_format] + _CALLS + bos + _CHATML).strip()


def use_named_template(tokenizer: Any, name: str, tool_format: str = "default") -> None:
    """Give ``tokenizer`` a named chat template; its turn markers must be single tokens of its vocabulary."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        raise TemplateError(f"dataset.template={name}: the tokenizer has no {' / '.join(missing)} token; add "
                            "them to the tokenizer and resize the model's embeddings once, before training "
                            "(README, Troubleshooting, shows how), or use a model whose tokenizer has a chat "
                            "template")  # fmt: skip
    if name == "cpm4" and tokenizer.bos_token is None:
        raise TemplateError("dataset.template=cpm4: the tokenizer has no BOS token")
    tokenizer.chat_template = named_template(name, tool_format)
    if "<|im_end|>" not in tokenizer.all_special_tokens:
        # An end-of-turn marker, added to the tokenizer's special tokens (transformers 5 replaces
        # the list by default: a tokenizer's <tool_call> tokens were no longer special once saved).
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]}, replace_extra_special_tokens=False)
