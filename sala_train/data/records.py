"""Records of every dataset format -> one canonical shape per kind, or the reason they are bad.

Canonical shapes (plain dicts, one Arrow schema per kind):

- ``chat``: ``messages`` = [{role, content, tool_calls}, ...] with roles system? (user assistant)+, where
  an assistant turn may call tools (``tool_calls``: JSON text of [{name, arguments}], else "") and
  ``tool`` turns carry the results before the next assistant turn; ``tools``: JSON text of the
  function schemas offered (HF's ``{"type": "function", "function": ...}`` form), else "";
- ``preference``: ``prompt`` messages ending with a user turn (or a call's results), ``chosen`` and
  ``rejected`` assistant messages (text, tool calls, or both), ``tools`` as for chat; a text prompt
  (alpaca's layout) is preceded by the record's ``history`` turns, as alpaca chat data is;
- ``kto``: ``prompt`` as for preference, ``completion`` (an assistant message), boolean ``label``, ``tools``;
- ``text``: ``text`` (a document), or ``messages`` (a whole chat rendered as one document).

Field and role names come from ``dataset.columns`` / ``dataset.tags`` (LLaMA-Factory's
``dataset_info.json`` keys), with each format's defaults. Converting by hand because neither
datasets nor TRL maps LLaMA-Factory's layouts, and their errors name no record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from sala_train.config.schema import (
    CHAT_FORMATS,
    DatasetColumns,
    DatasetConfig,
    DatasetFormat,
    DatasetSource,
    DatasetTags,
)


class BadRecord(Exception):
    """``reason`` is the category counted in reports; ``detail`` says where in the record."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_DEFAULT_COLUMNS = {
    DatasetFormat.MESSAGES: DatasetColumns(messages="messages", system="system", tools="tools"),
    DatasetFormat.SHAREGPT: DatasetColumns(messages="conversations", system="system", tools="tools"),
    DatasetFormat.ALPACA: DatasetColumns(
        prompt="instruction", query="input", response="output", history="history", system="system", tools="tools"
    ),
    DatasetFormat.PREFERENCE: DatasetColumns(
        prompt="prompt", query="input", chosen="chosen", rejected="rejected", system="system", tools="tools"
    ),
    DatasetFormat.KTO: DatasetColumns(
        prompt="prompt", query="input", completion="completion", kto_tag="label", system="system", tools="tools"
    ),
    DatasetFormat.TEXT: DatasetColumns(text="text"),
}
_SHAREGPT_TAGS = DatasetTags(role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt",
                             system_tag="system", function_tag="function_call",
                             observation_tag="observation")  # fmt: skip
_OPENAI_TAGS = DatasetTags(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant",
                           system_tag="system", function_tag="function_call", observation_tag="tool")  # fmt: skip


# The columns each format reads (``text`` also takes LLaMA-Factory's ``prompt`` for pre-training text).
_READS: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.MESSAGES: ("messages", "system", "tools"),
    DatasetFormat.SHAREGPT: ("messages", "system", "tools"),
    DatasetFormat.ALPACA: ("prompt", "query", "response", "history", "system", "tools"),
    DatasetFormat.PREFERENCE: ("messages", "prompt", "query", "chosen", "rejected", "history", "system", "tools"),
    DatasetFormat.KTO: (
        "messages",
        "prompt",
        "query",
        "completion",
        "response",
        "kto_tag",
        "history",
        "system",
        "tools",
    ),
    DatasetFormat.TEXT: ("text", "prompt"),
}


def unread_columns(cfg: DatasetConfig | DatasetSource) -> list[str]:
    """The ``columns`` keys a config names that its format never reads (``kto_tag`` for preference
    data, say): they were ignored without a word, so a misplaced mapping looked applied."""
    reads = _READS[cfg.format]
    return [key for key, name in vars(cfg.columns).items() if name not in (None, "") and key not in reads]


# Optional columns a config may name '' to leave unread (an unrelated "tools" field beside messages
# made every record bad, and naming no field at all was refused as a typo).
NOT_READ_WHEN_EMPTY = ("system", "tools", "history", "query")


@dataclass(frozen=True)
class Layout:
    """The resolved field and role names of one dataset config."""

    format: DatasetFormat
    columns: DatasetColumns
    tags: DatasetTags
    # (config key, file field) of each column the config names that this format reads: a file
    # without it is refused, not read as if the field were empty (a typo would drop its text).
    mapped: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, cfg: DatasetConfig | DatasetSource) -> Layout:
        defaults = _DEFAULT_COLUMNS[cfg.format]
        given = cfg.columns
        if cfg.format == DatasetFormat.TEXT and given.text is None and given.prompt is not None:
            # LLaMA-Factory names a pre-training text column ``prompt`` (c4_demo: {"prompt": "text"}).
            given = DatasetColumns(text=given.prompt)
        columns = DatasetColumns(**{k: v if v is not None else getattr(defaults, k) for k, v in vars(given).items()})
        if cfg.format == DatasetFormat.KTO and given.completion is None and given.response is not None:
            # LLaMA-Factory's KTO entries name the reply ``response`` (alpaca's ``output``): its key too.
            columns = dataclasses.replace(columns, completion=given.response)
        # Preference and KTO data come in both layouts (LLaMA-Factory's ranking sets are sharegpt's):
        # a role tag "from" means sharegpt's names for the rest (human, gpt, observation, ...).
        paired = cfg.format in (DatasetFormat.PREFERENCE, DatasetFormat.KTO)
        sharegpt = cfg.format == DatasetFormat.SHAREGPT or (paired and cfg.tags.role_tag == _SHAREGPT_TAGS.role_tag)
        default_tags = _SHAREGPT_TAGS if sharegpt else _OPENAI_TAGS
        tags = DatasetTags(**{k: v if v is not None else getattr(default_tags, k) for k, v in vars(cfg.tags).items()})
        mapped = tuple(
            (k, getattr(columns, k))
            for k in _READS[cfg.format]
            if getattr(given, k) is not None and not (getattr(given, k) == "" and k in NOT_READ_WHEN_EMPTY)
        )
        return cls(cfg.format, columns, tags, mapped)

    def required_fields(self) -> list[str]:
        """Fields every record must have (checked once per file, before records)."""
        c = self.columns
        match self.format:
            case DatasetFormat.MESSAGES | DatasetFormat.SHAREGPT:
                return [c.messages or ""]
            case DatasetFormat.ALPACA:
                return [c.prompt or "", c.response or ""]
            case DatasetFormat.PREFERENCE:
                return [self._prompt_field(), c.chosen or "", c.rejected or ""]
            case DatasetFormat.KTO:
                return [self._prompt_field(), c.kto_tag or ""] + ([] if self._conversation() else [c.completion or ""])
            case DatasetFormat.TEXT:
                return [c.text or ""]
        raise AssertionError(self.format)

    def _conversation(self) -> bool:
        return self.columns.messages is not None

    def may_imply_prompt(self) -> bool:
        """Whether preference records without their prompt field may be TRL's implicit-prompt layout
        (chosen and rejected each a whole conversation, sharing every turn but the last): not where
        the config names the prompt's field, or a conversation field that holds it."""
        named = {key for key, _ in self.mapped}
        return self.format == DatasetFormat.PREFERENCE and not self._conversation() and "prompt" not in named

    def _prompt_field(self) -> str:
        return (self.columns.messages if self._conversation() else self.columns.prompt) or ""


def kind_of(fmt: DatasetFormat) -> str:
    return "chat" if fmt in CHAT_FORMATS else fmt.value


# --- messages ---------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """What a JSON value is, for messages: "a number", "a list", ..."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _string(value: Any, where: str, empty: str) -> str:
    """``value`` if it is text that is not blank; otherwise BadRecord saying what it is, so that a
    number or a list is reported as such rather than as missing text."""
    if isinstance(value, str) and value.strip():
        return value
    if value is None or isinstance(value, str):
        raise BadRecord("empty content", empty)
    raise BadRecord("not text", f"{where} is {describe(value)}, expected text")


def _optional_string(value: Any, where: str) -> str:
    """Optional text (a system prompt, an alpaca input): "" when absent, never silently ignored."""
    if value is None or isinstance(value, str):
        return value or ""
    raise BadRecord("not text", f"{where} is {describe(value)}, expected text")


def _field(record: dict[str, Any], name: str | None) -> Any:
    if name is None or record.get(name) is None:
        raise BadRecord("missing field", f"no '{name}'")
    return record[name]


def _without_nulls(value: Any) -> Any:
    """Objects stripped of null-valued keys.

    Tools and call arguments given as JSON objects (not text) reach us through Arrow, which unifies
    the objects of all records into one struct and fills each one's missing keys with null: one
    record's schema would otherwise show another record's parameters.
    """
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# What json.loads raises on text it cannot take: bad syntax, a number of more digits than Python
# converts (4,300 by default, a ValueError), nesting deeper than its recursion limit.
JSON_PROBLEMS = (ValueError, RecursionError)


def json_problem(exc: BaseException) -> str:
    """What is wrong with JSON text, from what ``json.loads`` raised (one of ``JSON_PROBLEMS``)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return f"a value Python cannot read ({str(exc).split(';')[0]})"


def _json_value(raw: Any, reason: str, where: str) -> Any:
    """A value given as JSON text or as (Arrow-read) objects, in plain Python form."""
    if not isinstance(raw, str):
        return _without_nulls(raw)
    try:
        return json.loads(raw)
    except JSON_PROBLEMS as exc:
        raise BadRecord(reason, f"{where} is not JSON: {json_problem(exc)}") from exc


def _call_list(raw: Any, where: str) -> str:
    """Tool calls as canonical JSON text: [{"name", "arguments": {...}}, ...].

    Accepts LLaMA-Factory's call text (one JSON object or a list) and OpenAI's ``tool_calls``
    (``{"type": "function", "function": {"name", "arguments": "<json>"}}``).
    """
    raw = _json_value(raw, "malformed tool call", where)
    calls = []
    for call in raw if isinstance(raw, list) else [raw]:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        name = call.get("name") if isinstance(call, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise BadRecord("malformed tool call", f"{where} has no function name")
        arguments = call.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except JSON_PROBLEMS as exc:
                raise BadRecord("malformed tool call", f"{where}: arguments of {name} are not JSON") from exc
        if not isinstance(arguments, dict | None):
            raise BadRecord("malformed tool call", f"{where}: arguments of {name} must be an object")
        calls.append({"name": name, "arguments": arguments or {}})
    if not calls:
        raise BadRecord("malformed tool call", f"{where} holds no call")
    return json.dumps(calls, ensure_ascii=False)


def _message(raw: Any, tags: DatasetTags, where: str, tool_use: bool = False) -> dict[str, str]:
    """One message in canonical form; ``tool_use``: function-call and observation turns allowed."""
    if not isinstance(raw, dict):
        raise BadRecord("malformed message", f"{where} is not an object")
    roles = {tags.user_tag: "user", tags.assistant_tag: "assistant", tags.system_tag: "system"}
    if tool_use:
        roles |= {tags.function_tag: "function_call", tags.observation_tag: "tool"}
    # A dataset.tags.* that names no key of the messages: say which setting (an OpenAI-style call
    # may leave out its content).
    needed = {"role_tag": tags.role_tag} | ({} if raw.get("tool_calls") else {"content_tag": tags.content_tag})
    for tag, key in needed.items():
        if key not in raw:
            keys = ", ".join(repr(k) for k in raw) or "none"
            raise BadRecord(f"no {tag.removesuffix('_tag')} key",
                            f"{where} has no {key!r} (dataset.tags.{tag}); its keys: {keys}")  # fmt: skip
    role = raw[tags.role_tag]
    if not isinstance(role, str) or role not in roles:  # (a list or object as the role is unhashable)
        known = ", ".join(repr(r) for r in roles)
        raise BadRecord("unknown role", f"{where} has {tags.role_tag}={role!r}, expected one of {known}")
    content = raw.get(tags.content_tag or "")
    if roles[role] == "function_call":  # LLaMA-Factory: the call's JSON is the content
        return {"role": "assistant", "content": "", "tool_calls": _call_list(content, where)}
    calls = raw.get("tool_calls")
    if isinstance(calls, str) and calls.strip() in ("", "[]"):
        calls = None
    if calls and not (tool_use and roles[role] == "assistant"):  # never dropped without a word
        raise BadRecord(
            "unsupported tool call", f"{where} ({role}) has tool_calls; only assistant turns of conversations may call"
        )
    if calls:  # OpenAI: calls beside the text
        text = _optional_string(content, f"{where} ({role}): '{tags.content_tag}'").strip()
        return {"role": "assistant", "content": text, "tool_calls": _call_list(calls, where)}
    content = _string(content, f"{where} ({role}): '{tags.content_tag}'",
                      f"{where} ({role}) has no text in '{tags.content_tag}'")  # fmt: skip
    return _plain(roles[role], content)


def _messages(raw: Any, tags: DatasetTags, column: str, tool_use: bool = False) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        found = "an empty list" if raw == [] else describe(raw)
        raise BadRecord("malformed messages", f"'{column}' must be a non-empty list of messages, not {found}")
    # A conversation that opens with an empty system prompt, as OpenAI-style exports write one, has
    # none: the template's own default applies, as for a blank alpaca system column and in
    # LLaMA-Factory. (The record's roles keep the file's numbering: see _check_order's names.)
    first = 1 if len(raw) > 1 and _blank_system(raw[0], tags) else 0
    return [_message(m, tags, f"{column}[{i}]", tool_use) for i, m in enumerate(raw) if i >= first]


def _blank_system(raw: Any, tags: DatasetTags) -> bool:
    if not isinstance(raw, dict) or raw.get(tags.role_tag or "") != tags.system_tag or raw.get("tool_calls"):
        return False
    content = raw.get(tags.content_tag or "", "missing")
    return content is None or (isinstance(content, str) and not content.strip())


def _next_roles(previous: dict[str, str] | None) -> tuple[str, ...]:
    """Roles that may follow ``previous``: a reply after a user turn, tool results after a call."""
    if previous is None or (previous["role"] == "assistant" and not previous["tool_calls"]):
        return ("user",)
    if previous["role"] == "assistant":
        return ("tool",)
    return ("tool", "assistant") if previous["role"] == "tool" else ("assistant",)


def _file_roles(raw: list[Any], tags: DatasetTags) -> list[str]:
    """The role of each message as the file writes it (``_messages`` has checked they are objects)."""
    return [str(message.get(tags.role_tag or "")) for message in raw]


def _check_order(
    messages: list[dict[str, str]],
    ends_with: tuple[str, ...],
    column: str,
    tags: DatasetTags,
    names: list[str] | None = None,
) -> None:
    """system? then user/assistant alternating from user (a call's results between), ending with one of ``ends_with``.

    Messages name roles as the file does (sharegpt: human, gpt): ``names`` holds the file's role of
    each message of ``column``, which may follow a system turn taken from the record's system field.
    """
    tag = {"user": tags.user_tag, "assistant": tags.assistant_tag, "system": tags.system_tag,
           "tool": tags.observation_tag}  # fmt: skip
    added = len(messages) - len(names) if names is not None else 0
    start = 1 if messages and messages[0]["role"] == "system" else 0
    previous = None
    for position in range(start, len(messages)):
        msg = messages[position]
        expected = _next_roles(previous)
        if msg["role"] not in expected:
            found = names[position - added] if names is not None else tag[msg["role"]]
            wanted = " or ".join(tag[role] or role for role in expected)
            raise BadRecord("roles out of order", f"{column}[{position - added}] is {found}, expected {wanted}")
        previous = msg
    if previous is None or previous["role"] not in ends_with:
        endings = [tag[role] or role for role in ends_with]
        article = "an" if endings[0][:1] in "aeio" else "a"  # an assistant, an observation; a user
        raise BadRecord("roles out of order", f"'{column}' must end with {article} {' or '.join(endings)} turn")


def _tools(record: dict[str, Any], layout: Layout) -> str:
    """The record's function schemas as JSON text in HF's tool form, or "" when it offers none."""
    raw = record.get(layout.columns.tools or "")
    where = f"'{layout.columns.tools}'"
    # (a field of that name that holds something else: the config can leave it unread)
    unread = "; if that field is not the tools offered, dataset.columns.tools='' leaves it unread"
    if isinstance(raw, str) and not raw.strip():
        return ""
    raw = _json_value(raw, "malformed tools", where)
    if raw is None or raw == []:
        return ""
    if not isinstance(raw, list):
        raise BadRecord("malformed tools", f"{where} must be a list of function schemas{unread}")
    tools = []
    for i, tool in enumerate(raw):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise BadRecord("malformed tools", f"{where}[{i}] is not a function schema with a name{unread}")
        tools.append({"type": "function", "function": spec})
    return json.dumps(tools, ensure_ascii=False)


def _plain(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content, "tool_calls": ""}


def _with_system(record: dict[str, Any], layout: Layout, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = _optional_string(record.get(layout.columns.system or ""), f"'{layout.columns.system}'")
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [_plain("system", system), *messages]
    return messages


def _user_text(record: dict[str, Any], layout: Layout) -> str:
    """The instruction and the input, each where not blank (as LLaMA-Factory joins them: an empty
    instruction with an input is the input alone)."""
    where = f"'{layout.columns.prompt}'"
    prompt = _optional_string(_field(record, layout.columns.prompt), where)
    query = _optional_string(record.get(layout.columns.query or ""), f"'{layout.columns.query}'")
    parts = [text for text in (prompt, query) if text.strip()]
    if not parts:
        raise BadRecord(
            "empty content", f"{where} is empty" + (f" and so is '{layout.columns.query}'" if query else "")
        )
    return "\n".join(parts)


def _history(record: dict[str, Any], layout: Layout) -> list[dict[str, str]]:
    """Alpaca's earlier turns: [[query, response], ...] -> user and assistant messages, in order."""
    history = record.get(layout.columns.history or "")
    if history in (None, []):
        return []
    out = []
    for i, pair in enumerate(history if isinstance(history, list) else [None]):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
            raise BadRecord("malformed history", f"'{layout.columns.history}'[{i}] must be a [query, response] pair")
        out += [_plain("user", pair[0]), _plain("assistant", pair[1])]
    return out


def _no_history(record: dict[str, Any], layout: Layout, column: str) -> None:
    """A prompt given as messages holds its own earlier turns (LLaMA-Factory reads history only in
    alpaca's layout): history beside it is refused, never dropped unsaid."""
    if record.get(layout.columns.history or "") not in (None, []):
        raise BadRecord(
            "unsupported history",
            f"'{layout.columns.history}' beside '{column}', which holds messages: put the earlier turns in them",
        )


# A preference or KTO prompt ends where a reply is due: after a user turn, or after the results of
# the tool calls the conversation made (the reply then uses them, or calls again).
PROMPT_ENDINGS = ("user", "tool")


def _prompt_messages(record: dict[str, Any], layout: Layout, implied: tuple[str, list[Any]] | None = None
                     ) -> list[dict[str, str]]:  # fmt: skip
    """The prompt of a preference or KTO record, checked to end where a reply is due (``implied``:
    the field and turns that hold it in TRL's implicit-prompt layout)."""
    if implied is None:
        column = layout._prompt_field()
        raw: Any = _field(record, column)
    else:
        column, raw = implied
    if isinstance(raw, list) or layout.columns.messages is not None:
        _no_history(record, layout, column)
        messages = _messages(raw, layout.tags, column, tool_use=True)
        names = _file_roles(raw, layout.tags)
    else:  # alpaca's layout (LLaMA-Factory's ranking and KTO sets): earlier turns, then the question
        messages, names = [*_history(record, layout), _plain("user", _user_text(record, layout))], None
    messages = _with_system(record, layout, messages)
    _check_order(messages, PROMPT_ENDINGS, column, layout.tags, names)
    return messages


def _reply(raw: Any, layout: Layout, column: str) -> dict[str, str]:
    """A reply (an assistant message: text, tool calls, or both) given as a string, one message
    object, or a list of that one message (TRL's conversational form)."""
    if isinstance(raw, list):
        if len(raw) > 1:  # a call, its result and an answer: never cut down to the answer unsaid
            raise BadRecord("malformed reply", f"'{column}' holds {len(raw)} messages; give the one reply")
        raw = raw[0] if raw else None
    if isinstance(raw, dict):
        message = _message(raw, layout.tags, column, tool_use=True)
        if message["role"] != "assistant":
            raise BadRecord("roles out of order", f"'{column}' is a {message['role']} message, expected assistant")
        return message
    return _plain("assistant", _string(raw, f"'{column}'", f"'{column}' has no text"))


# --- per format --------------------------------------------------------------------------------


def _chat(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    c = layout.columns
    names = None
    if layout.format == DatasetFormat.ALPACA:
        response = _string(_field(record, c.response), f"'{c.response}'", f"'{c.response}' is empty")
        messages = [*_history(record, layout), _plain("user", _user_text(record, layout)),
                    _plain("assistant", response)]  # fmt: skip
        column = c.prompt or ""
    else:
        column = c.messages or ""
        raw = _field(record, column)
        messages = _messages(raw, layout.tags, column, tool_use=True)
        names = _file_roles(raw, layout.tags)
    messages = _with_system(record, layout, messages)
    _check_order(messages, ("assistant",), column, layout.tags, names)
    return {"messages": messages, "tools": _tools(record, layout)}


def _same_reply(a: dict[str, str], b: dict[str, str]) -> bool:
    """Same text and the same calls (arguments compared as objects: their key order is no preference)."""
    calls = [json.loads(m["tool_calls"]) if m["tool_calls"] else [] for m in (a, b)]
    return a["content"].strip() == b["content"].strip() and calls[0] == calls[1]


def _preference(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    c = layout.columns
    raw_chosen, raw_rejected = _field(record, c.chosen), _field(record, c.rejected)
    if layout.may_imply_prompt() and record.get(c.prompt or "") is None:
        shared, raw_chosen, raw_rejected = _implied_prompt(raw_chosen, raw_rejected, layout)
        prompt = _prompt_messages(record, layout, (c.chosen or "", shared))
    else:
        prompt = _prompt_messages(record, layout)
    chosen = _reply(raw_chosen, layout, c.chosen or "")
    rejected = _reply(raw_rejected, layout, c.rejected or "")
    if _same_reply(chosen, rejected):
        raise BadRecord("chosen equals rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": _tools(record, layout)}


def _implied_prompt(chosen: Any, rejected: Any, layout: Layout) -> tuple[list[Any], Any, Any]:
    """TRL's implicit-prompt layout (its ultrafeedback and hh-rlhf sets): no prompt field, chosen
    and rejected each a whole conversation whose turns but the last are the prompt they share.
    Returns those turns and the two last messages."""
    c = layout.columns
    if not (isinstance(chosen, list) and len(chosen) > 1):
        raise BadRecord("missing field", f"no '{c.prompt}', and '{c.chosen}' is not a whole conversation either "
                        "(TRL's implicit prompt), so the record has no prompt")  # fmt: skip
    if not isinstance(rejected, list) or _without_nulls(chosen[:-1]) != _without_nulls(rejected[:-1]):
        raise BadRecord("malformed reply", f"no '{c.prompt}', and '{c.chosen}' and '{c.rejected}' do not share "
                        "every turn but their last (TRL's implicit prompt), which would be their prompt")  # fmt: skip
    return chosen[:-1], chosen[-1], rejected[-1]


def _kto(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    label = _field(record, layout.columns.kto_tag)
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV has no booleans
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise BadRecord("label not a boolean", f"'{layout.columns.kto_tag}' is {label!r}, expected true or false")
    if layout.columns.messages is not None:
        column = layout.columns.messages
        raw = _field(record, column)
        _no_history(record, layout, column)
        messages = _with_system(record, layout, _messages(raw, layout.tags, column, tool_use=True))
        _check_order(messages, ("assistant",), column, layout.tags, _file_roles(raw, layout.tags))
        prompt, completion = messages[:-1], messages[-1]
    else:
        prompt = _prompt_messages(record, layout)
        completion = _reply(_field(record, layout.columns.completion), layout, layout.columns.completion or "")
    return {"prompt": prompt, "completion": completion, "label": label, "tools": _tools(record, layout)}


def _text(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    column = layout.columns.text or ""
    raw = _field(record, column)
    if isinstance(raw, list):
        return {"text": "", "messages": _messages(raw, layout.tags, column)}
    return {"text": _string(raw, f"'{column}'", f"'{column}' has no text"), "messages": []}


_CONVERTERS = {
    "chat": _chat,
    "preference": _preference,
    "kto": _kto,
    "text": _text,
}


# LLaMA-Factory's multimodal fields (its mllm_demo: "images": ["mllm_demo_data/1.jpg"] beside an
# "<image>" in the text). The models sala-train trains take text alone: the media were dropped
# without a word, and their placeholders trained as text.
MEDIA_FIELDS = ("images", "videos", "audios")


def canonical(record: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The canonical form of one record, or BadRecord."""
    mapped = set(vars(layout.columns).values())
    for name in MEDIA_FIELDS:
        if name not in mapped and record.get(name):  # (null or []: a text record of a mixed file)
            raise BadRecord(
                f"holds {name}",
                f"field '{name}' ({describe(record[name])}): the text models sala-train trains would not see them, and "
                "their placeholders would train as text; leave such records out (dataset.on_error=skip) or remove the "
                "field",
            )
    return _CONVERTERS[kind_of(layout.format)](record, layout)


# Empty canonical values: rows of bad records keep the schema, then get filtered out.
EMPTY = {
    "chat": {"messages": [], "tools": ""},
    "preference": {"prompt": [], "chosen": _plain("assistant", ""), "rejected": _plain("assistant", ""), "tools": ""},
    "kto": {"prompt": [], "completion": _plain("assistant", ""), "label": False, "tools": ""},
    "text": {"text": "", "messages": []},
}


def arrow_batches(records: Any, rows: int = 65_536) -> Any:
    """A split's records as Arrow tables of at most ``rows`` rows, in order (as the split reads
    them, an indices mapping included): a check over every record without a copy of them all
    (the whole split as one table took 800 MiB more at 400k chat records)."""
    return records.with_format("arrow").iter(batch_size=rows)
