"""Loss masks on multi-turn chats, checked token by token against hand-built expectations."""

from __future__ import annotations

import json
import typing

import pytest

from sala_train.data.chat import IGNORE_INDEX, TemplateError, TemplateRenderError, encode, segments

CHAT = [
    {"role": "system", "content": "You are a pirate. Start every answer with 'Arr!'."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "Arr! 2 plus 3 is 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "Arr! 5 times 4 is 20."},
    {"role": "user", "content": "What day comes after Monday?"},
    {"role": "assistant", "content": "Tuesday comes after Monday."},
]


def expected_ids_and_labels(tok, messages, end="<|im_end|>"):
    """ChatML written out by hand: only each reply and its end-of-turn token (``end``) are trained."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    for m in messages:
        if m["role"] == "assistant":
            add("<|im_start|>", False)
            add("assistant\n", False)
            add(m["content"], True)
            add(end, True)
            add("\n", False)
        else:
            add("<|im_start|>", False)
            add(f"{m['role']}\n{m['content']}", False)
            add(end, False)
            add("\n", False)
    return ids, labels


def trained_runs(tok, ids, labels):
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_multi_turn_masks_match_hand_built_expectation(tokenizer):
    enc = encode(tokenizer, CHAT, cutoff_len=4096)
    want_ids, want_labels = expected_ids_and_labels(tokenizer, CHAT)
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    assert not enc.truncated


def test_every_assistant_turn_and_its_end_token_trained(tokenizer):
    enc = encode(tokenizer, CHAT, cutoff_len=4096)
    replies = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert trained_runs(tokenizer, enc.input_ids, enc.labels) == replies
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    trained_ends = [i for i, lab in enumerate(enc.labels) if lab == im_end]
    assert len(trained_ends) == 3  # one per assistant turn, none for system/user
    for pos in trained_ends:
        assert enc.labels[pos + 1] == IGNORE_INDEX  # the newline after it is template glue
    assert im_start not in [lab for lab in enc.labels if lab != IGNORE_INDEX]  # headers never trained
    # the tokens are the template's own rendering
    assert tokenizer.decode(enc.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_truncation_keeps_prefix_and_marks_it(tokenizer):
    full = encode(tokenizer, CHAT, cutoff_len=4096)
    cut = len(full.input_ids) - 5
    enc = encode(tokenizer, CHAT, cutoff_len=cut)
    assert enc.truncated
    assert enc.input_ids == full.input_ids[:cut]
    assert enc.labels == full.labels[:cut]


def test_cutoff_before_first_reply_leaves_no_trained_token(tokenizer):
    first_trained = next(i for i, lab in enumerate(encode(tokenizer, CHAT, 4096).labels) if lab != IGNORE_INDEX)
    assert encode(tokenizer, CHAT, cutoff_len=first_trained).trained_tokens == 0
    assert encode(tokenizer, CHAT, cutoff_len=first_trained + 1).trained_tokens == 1


def test_guide_data_masks(tokenizer, guide_data):
    """The guide's own AdvertiseGen samples: each trained span is exactly the reply + <|im_end|>."""
    records = json.loads((guide_data / "AdvertiseGenChatML" / "train.json").read_text(encoding="utf-8"))
    for record in records:
        enc = encode(tokenizer, record["messages"], cutoff_len=100_000)
        want = [m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant"]
        assert trained_runs(tokenizer, enc.input_ids, enc.labels) == want
        assert (enc.input_ids, enc.labels) == expected_ids_and_labels(tokenizer, record["messages"])


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_refuses_template_that_is_not_prefix_stable(tokenizer):
    # Marks the final message differently, so earlier renderings are not prefixes of later ones.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[last] {% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix-stable"):
        segments(_with_template(tokenizer, template), CHAT)


def test_refuses_template_without_end_of_turn(tokenizer):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="end-of-turn"):
        segments(_with_template(tokenizer, template), CHAT)


def test_refuses_tokenizer_without_template(tokenizer):
    tok = _with_template(tokenizer, None)
    with pytest.raises(TemplateError, match="no chat template, which messages data needs; set dataset"):
        segments(tok, CHAT)


def test_a_template_that_fails_to_render_is_a_data_error_not_a_crash(tokenizer):
    # Gemma's and Mistral's templates refuse some turns with raise_exception; a template can also
    # simply be broken. Either must end as one message (exit 2), not a jinja2 traceback.
    refuses_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(TemplateRenderError) as refused:
        segments(_with_template(tokenizer, refuses_system), CHAT)
    assert str(refused.value).startswith(
        'the chat template failed on the turns [system, user] of the conversation beginning "You are a pirate. '
    )
    assert ": System role not supported; fix the tokenizer's template or replace it" in str(refused.value)
    # A Python error inside the template (here adding a number to the content) is the record's too.
    adds = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    with pytest.raises(TemplateRenderError, match=r"'Arr!'\.\": TypeError: can only concatenate str"):
        segments(_with_template(tokenizer, adds), CHAT)
    with pytest.raises(TemplateError, match=r"^the chat template is not valid Jinja \(line 1: unexpected '}'\)"):
        segments(_with_template(tokenizer, "{% for m in messages %}{{ m.content }{% endfor %}"), CHAT)


@pytest.fixture(scope="module")
def word_marker_tokenizer(tokenizer):
    """A SentencePiece-style tokenizer (Llama, Mistral: words marked with a leading "▁", one added at
    the start of a text), trained here offline, with the tiny model's ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for m in CHAT] * 20
    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *(f"<0x{i:02X}>" for i in range(256))]
    model.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", unk_token="<unk>", pad_token="</s>")
    tok.chat_template = tokenizer.chat_template
    return tok


def test_a_word_marker_tokenizer_trains_replies_as_inference_tokenizes_them(word_marker_tokenizer):
    """Segments tokenized one by one each got a leading "▁": every reply was trained as " Arr! ..."
    (a space inference never puts there), and the ids were not the conversation's own."""
    from sala_train.data.chat import prompt_and_reply

    tok = word_marker_tokenizer
    encoded = encode(tok, CHAT, 4096)
    whole = tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert encoded.input_ids == list(whole)  # the template's own tokenization of the conversation
    replies = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert trained_runs(tok, encoded.input_ids, encoded.labels) == replies
    # (decode drops a leading "▁": the tokens themselves say whether a reply starts with a space)
    starts = [tok.convert_ids_to_tokens(i) for i, label, before in
              zip(encoded.input_ids, encoded.labels, [IGNORE_INDEX, *encoded.labels], strict=False)
              if label != IGNORE_INDEX and before == IGNORE_INDEX]  # fmt: skip
    assert len(starts) == 3 and not any(t.startswith("▁") for t in starts), starts
    # DPO/KTO: a prompt with its generation header, then the reply, as the whole conversation gives.
    prompt, reply = prompt_and_reply(tok, CHAT[:2], CHAT[2])
    assert (
        prompt + reply
        == list(tok.apply_chat_template(CHAT[:3], tokenize=True, return_dict=False))[: len(prompt + reply)]
    )
    assert tok.decode(reply) == CHAT[2]["content"] + "<|im_end|>"


def test_a_token_across_a_replys_start_is_cut_there_as_inference_cuts_it(tokenizer):
    """A byte-level tokenizer with a "\\n\\n" token (Qwen's, Llama 3's, GPT-2's) merged the header's
    newline with a reply's leading one: the header's newline was trained, and DPO's chosen reply
    got the rejected reply's prompt (one newline more than the text). Inference tokenizes the
    prompt on its own and generates after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sala_train.data.chat import prompt_and_reply

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    texts = ["assistant\n\n\nAnswer here\n\n ok"] * 50 + ["Hi there user"] * 50
    specials = ["<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    model.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = tokenizer.chat_template
    assert "ĊĊ" in tok.get_vocab()
    prompt = [{"role": "user", "content": "Hi there"}]
    header = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    alone = tok(header, add_special_tokens=False)["input_ids"]  # the prompt as inference tokenizes it
    reply = "\n\nAnswer here"
    encoded = encode(tok, [*prompt, {"role": "assistant", "content": reply}], 4096)
    assert encoded.input_ids[: len(alone)] == alone and set(encoded.labels[: len(alone)]) == {IGNORE_INDEX}
    assert tok.decode([i for i in encoded.labels if i != IGNORE_INDEX]) == reply + "<|im_end|>"
    pairs = {text: prompt_and_reply(tok, prompt, {"role": "assistant", "content": text}) for text in (reply, "Answer")}
    assert [p for p, _ in pairs.values()] == [alone, alone]  # chosen and rejected share the prompt
    assert [tok.decode(r) for _, r in pairs.values()] == [reply + "<|im_end|>", "Answer<|im_end|>"]


@pytest.mark.parametrize("marker", ["metaspace-first", "metaspace-always", "prepend-normalizer"])
def test_a_word_marker_tokenizer_cut_at_a_replys_start_adds_no_word_marker(tokenizer, marker):
    """The pieces either side of a token across a reply's start were tokenized as fresh texts, and a
    SentencePiece-style tokenizer marks a text's first word: the prompt's newline and the reply
    each got a "▁" (MiniCPM's and Llama's tokenizer.json mark with a Prepend normalizer; transformers'
    Llama and Mistral with Metaspace). Every reply starting with a newline trained a space first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sala_train.data.chat import prompt_and_reply

    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if marker == "prepend-normalizer":
        model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        scheme = marker.removeprefix("metaspace-")
        model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *(f"<0x{i:02X}>" for i in range(256))]
    texts = ["Answer here\n\nok then\n\nmore text", "Hi there user\n\n", "\n\nAnswer"] * 50
    model.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", unk_token="<unk>", pad_token="</s>")
    tok.chat_template = tokenizer.chat_template
    assert {"\n\n", "▁\n\n"} & set(tok.get_vocab())  # (the header's newline merges with the reply's)
    prompt, reply = [{"role": "user", "content": "Hi there"}], {"role": "assistant", "content": "\n\nAnswer here"}
    header = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    alone = tok(header, add_special_tokens=False)["input_ids"]  # the prompt as inference tokenizes it
    encoded = encode(tok, [*prompt, reply], 4096)
    trained = [i for i in encoded.labels if i != IGNORE_INDEX]
    assert encoded.input_ids[: len(alone)] == alone and encoded.input_ids[len(alone) :][: len(trained)] == trained
    # (decode drops a leading "▁": the tokens themselves say what was trained)
    assert "".join(tok.convert_ids_to_tokens(trained)).replace("▁", " ") == reply["content"] + "<|im_end|>"
    assert prompt_and_reply(tok, prompt, reply) == (alone, trained)
    assert tok.convert_ids_to_tokens(tok("Answer", add_special_tokens=False)["input_ids"])[0].startswith(
        "▁"
    )  # (put back)


def test_a_byte_level_tokenizer_that_adds_a_prefix_space_tokenizes_a_cut_piece_without_it():
    """GPT-2's add_prefix_space marks a text's first word as Metaspace does (with "Ġ")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sala_train.data.chat import _as_mid_text

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=model)
    with _as_mid_text(tok):
        assert tok.convert_ids_to_tokens(tok("hi", add_special_tokens=False)["input_ids"]) == ["h", "i"]
    assert tok.convert_ids_to_tokens(tok("hi", add_special_tokens=False)["input_ids"]) == ["Ġ", "h", "i"]


def _byte_level(merges: list[tuple[str, str]], trim_offsets: bool, template: str):
    """A GPT-2-style byte-level BPE with exactly these merges, and its offsets trimmed or not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    model.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = template
    return tok


def test_a_reply_cut_is_found_with_trimmed_offsets_and_a_split_character_is_not_doubled(tokenizer):
    """GPT-2's tokenizer trims blanks off its offsets: a token of the header's newline and an
    indented reply's spaces looked zero wide, so the cut was missed (the newline trained, and the
    prompt unlike inference's). A character a byte-level BPE splits across tokens (an emoji after a
    prompt's last space) had its bytes tokenized twice when the first token was cut."""
    indent = [("Ċ", "Ġ"), ("ĊĠ", "Ġ"), ("ĊĠĠ", "Ġ")]
    trimmed = _byte_level(indent, trim_offsets=True, template=tokenizer.chat_template)
    emoji = [("Ġ", "ð"), ("Ġð", "Ł"), ("ĠðŁ", "ĺ")]  # " 😀": 'ĠðŁĺ' + 'Ģ'
    spaced = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + "
              "'<|im_end|>\\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")  # fmt: skip
    split = _byte_level(emoji, trim_offsets=False, template=spaced)
    for tok, reply in ((trimmed, "    def f():"), (trimmed, "  Hello"), (split, "\U0001f600 Sure.")):
        prompt = [{"role": "user", "content": "hi"}]
        header = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        alone = tok(header, add_special_tokens=False)["input_ids"]  # the prompt as inference tokenizes it
        whole = tok(header + reply, add_special_tokens=False)["input_ids"]
        assert whole[: len(alone)] != alone  # (a token across the reply's start: the case under test)
        encoded = encode(tok, [*prompt, {"role": "assistant", "content": reply}], 4096)
        assert encoded.input_ids[: len(alone)] == alone and set(encoded.labels[: len(alone)]) == {IGNORE_INDEX}
        trained = [i for i in encoded.labels if i != IGNORE_INDEX]
        assert encoded.input_ids[len(alone) : len(alone) + len(trained)] == trained  # the reply, from its start
        assert tok.decode(trained).startswith(reply + "<|im_end|>"), (reply, tok.convert_ids_to_tokens(trained))
        assert tok.decode(encoded.input_ids) == tok.apply_chat_template(
            [*prompt, {"role": "assistant", "content": reply}], tokenize=False
        )


def _ids_by_segment_token_by_token(tok, parts):
    """The per-token reference (``_ids_by_segment``'s first version, a loop over tokens): tokens
    grouped where they share a character; a group a reply's start cuts is tokenized again piece by
    piece, as a text's middle; every other token goes to the segment it starts in."""
    import bisect
    import itertools

    from sala_train.data.chat import _as_mid_text, _whole_offsets

    text = "".join(seg.text for seg in parts)
    starts = [0, *itertools.accumulate(len(seg.text) for seg in parts)][:-1]
    cuts = [start for start, seg in zip(starts, parts, strict=True) if seg.trained]
    ids, offsets = _whole_offsets(tok, text)
    groups, reach = [], -1
    for token, (start, end) in zip(ids, offsets, strict=True):
        if groups and start < reach:
            groups[-1].append((token, start, end))
        else:
            groups.append([(token, start, end)])
        reach = max(reach, end)
    out = [[] for _ in parts]
    for group in groups:
        start, end = group[0][1], max(e for _, _, e in group)
        inside = [cut for cut in cuts if start < cut < end]
        if not inside:
            for token, first, _ in group:
                out[bisect.bisect_right(starts, first) - 1].append(token)
            continue
        for a, b in itertools.pairwise([start, *inside, end]):
            if a > 0:
                with _as_mid_text(tok):
                    piece = tok(text[a:b], add_special_tokens=False)["input_ids"]
            else:
                piece = tok(text[a:b], add_special_tokens=False)["input_ids"]
            out[bisect.bisect_right(starts, a) - 1] += piece
    return out


def test_each_segments_ids_match_a_token_by_token_reading_on_random_texts(tokenizer, word_marker_tokenizer):
    """``_ids_by_segment`` reads the offsets with numpy: on random conversations of emoji, CJK,
    blanks and markup, split at random places, every tokenizer kind gives the per-token reading's
    ids, segment by segment (and the cases it exists for, a cut inside a token, do occur)."""
    import random

    from sala_train.data.chat import Segment, _ids_by_segment

    emoji = _byte_level([("Ġ", "ð"), ("Ġð", "Ł"), ("ĠðŁ", "ĺ")], trim_offsets=False, template="")
    trimmed = _byte_level([("Ċ", "Ġ"), ("ĊĠ", "Ġ"), ("ĊĠĠ", "Ġ")], trim_offsets=True, template="")
    pieces = ["Hello", " world", "\n", "  ", "    def f():", " \U0001f600", "\U0001f600", "宽松的阔腿裤", "好",
              "<|im_start|>", "<|im_end|>", "assistant\n", "Arr!", " 5", "\t", "é", "▁x"]  # fmt: skip
    rng = random.Random(7)
    cut_inside = 0
    for tok in (tokenizer, word_marker_tokenizer, emoji, trimmed):
        for _ in range(150):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
            bounds = sorted(set(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4)))))
            parts = [Segment(text[a:b], rng.random() < 0.5)
                     for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]  # fmt: skip
            expected = _ids_by_segment_token_by_token(tok, parts)
            assert _ids_by_segment(tok, parts) == expected, (tok.name_or_path, parts)
            whole = tok(text, add_special_tokens=False)["input_ids"]
            cut_inside += [token for ids in expected for token in ids] != whole
    assert cut_inside > 20  # (tokens across a trained segment's start were cut: the re-tokenizing ran)


def test_whole_offsets_follow_the_tokenizer_as_it_is_now_and_leave_it_as_it_was():
    """The spans came from a cached copy of the tokenizer without its post-processor: a token
    added after the first conversation was missing from the next (the copy kept the old vocabulary),
    and a tokenizer with a Python component (a custom pre-tokenizer) could not be copied at all."""
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import AutoTokenizer

    from tests.conftest import TINY_CHAT

    tok = AutoTokenizer.from_pretrained(TINY_CHAT)  # (its own: tokens are added to it)
    chat = [{"role": "user", "content": "call <tool_x> now"}, {"role": "assistant", "content": "ok <tool_x>"}]
    encode(tok, chat, 4096)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_x>"]})
    added = tok.convert_tokens_to_ids("<tool_x>")
    assert encode(tok, chat, 4096).input_ids.count(added) == 2
    processor = tok.backend_tokenizer.post_processor
    assert str(tok.backend_tokenizer.post_processor) == str(processor)  # put back as it was

    class SplitOnSpace:  # (transformers' RoFormer tokenizer sets one like it: jieba's words)
        def pre_tokenize(self, pretokenized):
            pretokenized.split(lambda i, s: s.split(" ", "merged_with_next"))

    tok.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(SplitOnSpace())
    encoded = encode(tok, chat, 4096)  # (it raised: "Custom PreTokenizer cannot be serialized")
    whole = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == whole and encoded.labels.count(added) == 1


def test_a_slow_tokenizer_is_warned_about(tokenizer):
    """Without offsets, conversations are tokenized piece by piece (a SentencePiece-style tokenizer
    then trains a space before every reply): said, not silent. (transformers 5 backs its own
    classes with fast tokenizers; a remote-code one may still be a Python PreTrainedTokenizer.)"""
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizer

    from sala_train.config.schema import DatasetFormat
    from sala_train.preflight import slow_tokenizer_warning

    class CharTokenizer(PreTrainedTokenizer):
        vocab: typing.ClassVar[dict[str, int]] = {chr(i): i for i in range(256)}
        vocab_size = 256

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    slow = CharTokenizer(eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    slow.chat_template = tokenizer.chat_template
    assert not slow.is_fast
    encoded = encode(slow, CHAT[1:3], 4096)  # (piece by piece, still exact for characters)
    assert slow.decode([i for i in encoded.labels if i != IGNORE_INDEX]) == CHAT[2]["content"] + "<|im_end|>"
    cfg = SimpleNamespace(
        model=SimpleNamespace(name_or_path="m"), dataset=SimpleNamespace(format=DatasetFormat.MESSAGES)
    )
    assert slow_tokenizer_warning(slow, cfg).startswith(
        "sala-train: WARNING: model.name_or_path=m loads a slow tokenizer"
    )
    assert slow_tokenizer_warning(tokenizer, cfg) is None
    text = SimpleNamespace(model=cfg.model, dataset=SimpleNamespace(format=DatasetFormat.TEXT))
    assert slow_tokenizer_warning(slow, text) is None


def test_the_slow_tokenizer_warning_is_said_once_by_rank_0(tmp_path, monkeypatch, capsys):
    """The checks before the ranks start (the launcher's; a SLURM job's data step, once per node)
    leave the warnings to rank 0: said there too, a run of several processes gave them twice."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import sala_train.preflight
    import sala_train.runner
    from sala_train.cli import _check_before_ranks
    from sala_train.config import io
    from sala_train.config.resolve import resolve_config
    from sala_train.config.schema import RunConfig

    warning = "sala-train: WARNING: a slow tokenizer"
    monkeypatch.setattr(sala_train.preflight, "slow_tokenizer_warning", lambda tokenizer, cfg: warning)
    monkeypatch.delenv("RANK", raising=False)
    # (in this process: the data step's stop watch and its library settings stay out of it)
    monkeypatch.setattr(sala_train.runner, "_stop_when_asked", lambda run_dir, node: None)
    monkeypatch.setattr(sala_train.runner, "quiet_libraries", lambda: None)
    with initialize_config_module(config_module="sala_train.conf", version_base="1.3"):
        composed = compose("train", overrides=["backend=ddp", "launcher.nproc_per_node=2"])
    run = resolve_config(OmegaConf.create(OmegaConf.to_container(composed)), RunConfig, tmp_path)
    io.save(run, tmp_path)
    assert _check_before_ranks(run) == 0 and sala_train.runner.prepare_data(tmp_path) == 0
    said = capsys.readouterr()
    assert "data ready on" in said.out and warning not in said.out + said.err
    sala_train.preflight.check_and_build_data(run)  # rank 0's
    said = capsys.readouterr()
    assert (said.out + said.err).count(warning) == 1


def test_a_reply_whose_text_is_in_the_templates_framing_is_trained_whole(tokenizer):
    """A gpt-oss-style assistant turn, ``<|channel|>final<|message|>{content}<|end|>``, with the
    reply "a": the reply was looked for from the turn's start, found inside "<|channel|>", and the
    cut fell on <|message|>, leaving "a" and its end-of-turn untrained, without a word."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if m['role'] == 'assistant' %}<|channel|>final<|message|>{% else %}\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    chat = [{"role": "user", "content": "Pick a, b or c."}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "final"}]  # fmt: skip
    trained = [seg.text for seg in segments(tok, chat) if seg.trained]
    assert trained == ["<|channel|>final<|message|>a<|im_end|>", "<|channel|>final<|message|>final<|im_end|>"]
    # A blank reply ends after the framing too, not at its first special token (<|channel|>).
    blank = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "  "}]
    assert [seg.text for seg in segments(tok, blank) if seg.trained] == ["<|channel|>final<|message|>  <|im_end|>"]
    encoded = encode(tok, chat, cutoff_len=1000)
    labelled = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    want = tok("<|channel|>final<|message|>a<|im_end|><|channel|>final<|message|>final<|im_end|>",
               add_special_tokens=False)["input_ids"]  # fmt: skip
    assert labelled == want


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_an_end_of_turn_token_special_only_in_the_added_tokens_or_the_pad_closes_replies(tokenizer, pad):
    """Meta ships Llama-3 tokenizers with <|eot_id|> marked special in added_tokens_decoder alone,
    and eos <|end_of_text|> (its base models): every conversation was refused for a template with
    "no end-of-turn token". So was one whose pad is the end-of-turn token (a common fine-tune
    setting), the pad being left out of the candidates. Here <|im_end|> stands for <|eot_id|>."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token, tok.pad_token = "<|endoftext|>", pad
    assert "<|im_end|>" not in tok.all_special_tokens or pad  # (special in added_tokens_decoder only)
    ids, labels = expected_ids_and_labels(tok, CHAT)
    encoded = encode(tok, CHAT, cutoff_len=10_000)
    assert encoded.input_ids == ids and encoded.labels == labels


def test_a_tokenizer_with_nothing_to_pad_with_is_refused(tmp_path):
    """No pad, eos or unk token: batches were padded with None, a TypeError at the first one."""
    from transformers import AutoTokenizer

    from sala_train.config.schema import ModelConfig
    from sala_train.errors import ModelLoadError
    from sala_train.models import load_tokenizer
    from tests.conftest import TINY_CHAT

    tok = AutoTokenizer.from_pretrained(TINY_CHAT)
    tok.eos_token = tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="its tokenizer has no pad, eos or unk token to pad batches with"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))


def test_a_template_that_rewrites_a_reply_is_that_conversations_problem(tokenizer):
    """Qwen3's template rewrites a reply's <think> block: the refusal named no conversation, and
    dataset.on_error=skip could not leave it out (a template-wide error, not a record's)."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ m['content'] | replace('<think>', '<reasoning>') }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _with_template(tokenizer, template)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert [seg.text for seg in segments(tok, plain) if seg.trained] == ["Hello.<|im_end|>"]
    thinking = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>hm</think>Because."}]
    with pytest.raises(TemplateRenderError) as caught:
        segments(tok, thinking)
    assert str(caught.value).startswith(
        "the chat template does not write the reply beginning '<think>hm</think>Because.' as given (it rewrites it), "
        "so the reply cannot be located, in the conversation beginning 'Why?'"
    )
    assert "dataset.on_error=skip" in str(caught.value)


EOT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_unmarked_eot(tokenizer):
    """The tokenizer with <|eot|>, an added token not marked special, closing each turn."""
    tok = _with_template(tokenizer, EOT_TEMPLATE)
    tok.add_tokens(["<|eot|>"], special_tokens=False)
    assert "<|eot|>" not in tok.all_special_tokens
    return tok


def test_an_end_of_turn_token_that_is_only_the_pad_closes_replies(tokenizer):
    """The pad is an end-of-turn candidate of its own: a fine-tune that pads with its unmarked
    end-of-turn token trains each reply up to and including it."""
    tok = _with_unmarked_eot(tokenizer)
    tok.pad_token = "<|eot|>"
    assert [seg.text for seg in segments(tok, CHAT) if seg.trained] == [
        f"{m['content']}<|eot|>" for m in CHAT if m["role"] == "assistant"
    ]
    ids, labels = expected_ids_and_labels(tok, CHAT, end="<|eot|>")
    encoded = encode(tok, CHAT, cutoff_len=10_000)
    assert encoded.input_ids == ids and encoded.labels == labels


def test_an_end_of_turn_token_not_marked_special_is_named_in_the_refusal(tokenizer):
    """The refusal names the unmarked token the template writes after the reply, and how to mark it."""
    with pytest.raises(TemplateError) as caught:
        segments(_with_unmarked_eot(tokenizer), CHAT)
    assert str(caught.value).endswith(
        "(<|eot|> follows the reply, but is not a special token of the tokenizer: mark it special in its "
        "tokenizer_config.json's added_tokens_decoder, or set dataset.template=chatml)"
    )
    # No added token after the reply: the refusal names none.
    plain = _with_template(tokenizer, EOT_TEMPLATE.replace("<|eot|>", "."))
    with pytest.raises(TemplateError) as caught:
        segments(plain, CHAT)
    assert str(caught.value).endswith("use a tokenizer whose template closes turns (e.g. <|im_end|>)")


def test_a_tokenizer_with_no_pad_or_eos_pads_with_its_unk_token(tmp_path):
    from transformers import AutoTokenizer

    from sala_train.config.schema import ModelConfig
    from sala_train.models import load_tokenizer
    from tests.conftest import TINY_CHAT

    tok = AutoTokenizer.from_pretrained(TINY_CHAT)
    tok.eos_token = tok.pad_token = None
    tok.add_special_tokens({"unk_token": "<unk>"})
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token == "<unk>" and loaded.pad_token_id == loaded.convert_tokens_to_ids("<unk>")


def test_a_named_template_on_a_tokenizer_without_its_markers_says_how_to_add_them():
    """The two refusals sent the user to each other: no template (set dataset.template=chatml),
    then no <|im_start|> token (and no way forward)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from sala_train.data.chat import use_named_template

    words = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(TemplateError) as refused:
        use_named_template(tokenizer, "chatml", "default")
    assert str(refused.value) == (
        "dataset.template=chatml: the tokenizer has no <|im_start|> / <|im_end|> token; add them to the tokenizer "
        "and resize the model's embeddings once, before training (README, Troubleshooting, shows how), or use a "
        "model whose tokenizer has a chat template"
    )
