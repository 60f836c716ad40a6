"""``core.text.has_lone_surrogate``: the one check every entry point makes before text goes further."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st

from core.text import has_lone_surrogate

SURROGATE = re.compile("[\ud800-\udfff]")  # what it replaced, the definition itself

# Any code point, surrogates included (hypothesis's text() leaves them out by default).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()))


@given(ANY_TEXT)
def test_it_finds_a_surrogate_exactly_where_there_is_one(text):
    assert has_lone_surrogate(text) is (SURROGATE.search(text) is not None)


def test_what_json_decodes():
    assert has_lone_surrogate(json.loads(r'"caf\u00e9 \ud800"'))  # a high one alone
    assert has_lone_surrogate(json.loads(r'"\udc00 after"'))  # a low one alone
    assert has_lone_surrogate(json.loads(r'"\ude00\ud83d"'))  # both, in the wrong order
    assert not has_lone_surrogate(json.loads(r'"\ud83d\ude00"'))  # a pair: one code point, U+1F600
    assert not has_lone_surrogate("plain ascii, and \\ud800 as text")
    assert not has_lone_surrogate("café 🙂 中文 \U0010ffff")
    assert not has_lone_surrogate("")


def test_text_storable_drops_nul_replaces_lone_surrogates_and_cuts_to_length():
    from core.text import text_storable

    assert text_storable("a\x00b") == "ab"
    assert text_storable("x\ud800y") == "x?y"
    assert text_storable("héllo wörld", 5) == "héllo"
    assert text_storable(42) == "42"
    plain = "nothing to change"
    assert text_storable(plain) is plain  # the common case copies nothing
