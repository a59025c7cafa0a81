from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dataplane.flowserve.detokenizer import (
    Detokenizer,
    IncrementalDecoder,
    StopStringFilter,
    TextDelta,
)


class ByteTokenizer:
    """Each token is a few bytes; decoding joins them and replaces broken UTF-8 with U+FFFD."""

    SPECIAL = 99

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        raw = b"".join(
            b"<eos>" if t == self.SPECIAL else self.pieces[t]
            for t in token_ids
            if not (skip_special_tokens and t == self.SPECIAL)
        )
        return raw.decode("utf-8", errors="replace")


SMILE = "🙂".encode()  # four bytes
TOKENIZER = ByteTokenizer(
    {
        0: b"Hi",
        1: b" th",
        2: b"ere",
        3: SMILE[:1],
        4: SMILE[1:3],
        5: SMILE[3:],
        6: b"\xc3",
        7: b"\xa9!",
    }
)


def stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.add(t) for t in ids]


def test_split_multibyte_characters_are_held_until_complete() -> None:
    deltas = stream(IncrementalDecoder(TOKENIZER), [0, 3, 4, 5, 1, 6, 7])
    assert deltas == ["Hi", "", "", "🙂", " th", "", "é!"]
    assert all("\ufffd" not in d for d in deltas)


def test_prompt_context_and_special_tokens() -> None:
    decoder = IncrementalDecoder(TOKENIZER, prompt_token_ids=[0, 1, 2])
    assert stream(decoder, [1, ByteTokenizer.SPECIAL, 2]) == [" th", "", "ere"]
    kept = IncrementalDecoder(TOKENIZER, skip_special_tokens=False)
    assert stream(kept, [0, ByteTokenizer.SPECIAL]) == ["Hi", "<eos>"]


def test_flush_gives_a_broken_tail() -> None:
    decoder = IncrementalDecoder(TOKENIZER)
    assert stream(decoder, [0, 3]) == ["Hi", ""]
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_stop_string_filter_holds_back_possible_starts() -> None:
    f = StopStringFilter(["STOP", "xy"])
    assert f.feed("abc S") == TextDelta("abc ")
    assert f.feed("T") == TextDelta("")
    assert f.feed("Ox") == TextDelta("STO")  # no longer STOP, but "x" may start "xy"
    assert f.feed("z") == TextDelta("xz")
    assert f.feed("..ST") == TextDelta("..")
    assert f.flush() == "ST"


def test_stop_string_across_deltas_cuts_before_it() -> None:
    f = StopStringFilter(["</end>"])
    out = [f.feed(t) for t in ["hello </", "e", "nd> after"]]
    assert out == [TextDelta("hello "), TextDelta(""), TextDelta("", stopped=True)]
    assert f.stopped and f.flush() == ""
    assert f.feed("more") == TextDelta("", stopped=True)


def test_earliest_stop_string_wins() -> None:
    f = StopStringFilter(["cd", "b"])
    assert f.feed("abcd") == TextDelta("a", stopped=True)


def test_detokenizer_with_stop_string_inside_a_token() -> None:
    detok = Detokenizer(TOKENIZER, stop=["here"])
    assert detok.add(0) == TextDelta("Hi")
    assert detok.add(1) == TextDelta(" t")  # the "h" may begin "here"
    assert detok.add(2) == TextDelta("", stopped=True)
    assert detok.text == "Hi t"
    assert detok.finish() == TextDelta("", stopped=True)


def test_detokenizer_finish_flushes_held_text() -> None:
    detok = Detokenizer(TOKENIZER, stop=["Hi there!"])
    assert [detok.add(t).text for t in [0, 1, 2]] == ["", "", ""]
    assert detok.finish() == TextDelta("Hi there")
    assert detok.text == "Hi there"


@pytest.mark.parametrize(
    "text",
    ["héllo wörld 你好 🙂🙂 done", "plain ascii words and more words", "ÿ€😀 mixed\nlines"],
)
def test_real_tokenizer_deltas_join_to_the_full_decode(tiny_model_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = tokenizer("prompt:")["input_ids"]
    detok = Detokenizer(tokenizer, prompt_token_ids=prompt)
    deltas = [detok.add(t).text for t in ids]
    deltas.append(detok.finish().text)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
