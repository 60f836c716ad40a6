"""The block-list matcher, the reply guard's incremental checks (pure logic), and the policy admin, which
refuses a block-list that could not be matched safely."""

from __future__ import annotations

import json
import re
import tracemalloc

import pytest
from django.urls import reverse
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from audit.models import AuditEvent
from chat.callers import Caller
from chat.moderation import ContentPolicyViolationError, JsonStrings, Moderation, ReplyGuard, moderation_drain
from chat.pipeline import _event_pieces, _message_arguments, _message_text
from providers.adapters.translate_anthropic import EventTranslator, message_from_completion
from providers.models import ModerationAction, ModerationChecker, ModerationPolicy
from providers.moderation import (
    SCAN_LIMIT_CHARS,
    Blocklist,
    PlainText,
    _word_pattern,
    _words_regex,
    blocklist_problems,
    policy_snapshot,
)

# THE BLOCK-LIST


def test_words_and_phrases_match_as_whole_words_in_any_case():
    blocklist = Blocklist("kill\nbad   phrase\n# a comment\n")

    assert blocklist.scan("I will KILL it").where == "entry 1 at character 7"
    assert blocklist.scan("a Bad\nphrase here").where == "entry 2 at character 2"
    assert blocklist.scan("killer skills, badphrase") is None


def test_a_word_matched_in_another_case_names_its_entry():
    blocklist = Blocklist("# house rules\nstraße\nkill")

    assert blocklist.scan("KİLL").where == "entry 3 at character 0"  # İ matches i, though their case folds differ
    assert blocklist.scan("STRAẞE").where == "entry 2 at character 0"


def test_patterns_and_the_first_hit_in_the_text():
    blocklist = Blocklist("zebra\nre:\\d{3}-\\d{4}")

    assert blocklist.scan("call 555-1234 about the zebra").where == "entry 2 at character 5"
    assert blocklist.scan("nothing here 55-1234") is None


def test_a_stream_scan_waits_for_the_next_piece_before_counting_a_word_at_the_very_end():
    blocklist = Blocklist("kill")

    assert blocklist.scan("we kill", final=False) is None  # it may yet be "killer"
    assert blocklist.scan("we killer", final=False) is None
    assert blocklist.scan("we kill it", final=False) is not None
    assert blocklist.scan("we kill", final=True) is not None


@pytest.mark.parametrize("where", ["first", "seam", "last"])
async def test_a_whole_input_is_scanned_however_long(where):
    """A request's input is read whole, a window at a time: a blocked word ahead of 200,000 characters of
    padding (the scan of one window) was let through, and one across two windows' seam is found too."""
    blocklist = Blocklist("forbidden\nre:secret\\s+plan")
    padding = "lorem ipsum " * 40_000  # 480,000 characters: three windows
    seam = SCAN_LIMIT_CHARS - SCAN_LIMIT_CHARS % 12  # after a space, less than a word before the first window ends
    text = {
        "first": "forbidden " + padding,
        "seam": padding[:seam] + "forbidden " + padding,
        "last": padding + " secret  plan",
    }[where]
    hit = await blocklist.scan_whole(text)
    assert hit is not None and hit.categories == ("blocklist",)
    assert await blocklist.scan_whole(padding + " forbiddenly") is None  # still whole words only


# Unicode: what the block-list matches through. Each text shows the word "forbidden" to a reader.
DISGUISED = {
    "full-width": "say ｆｏｒｂｉｄｄｅｎ now",
    "full-width capitals": "say ＦＯＲＢＩＤＤＥＮ now",
    "zero-width space": "say for\u200bbidden now",
    "zero-width joiners": "say f\u200do\u200cr\u2060bidden now",
    "soft hyphen": "say for\u00adbid\u00adden now",
    "bidi controls and a BOM": "say for\u202ebid\u202cden\ufeff now",
    "variation selectors": "say f\ufe0fo\ufe0erbidden now",
    "tag characters": "say forbid\U000e0041den now",
    "mathematical bold": "say 𝐟𝐨𝐫𝐛𝐢𝐝𝐝𝐞𝐧 now",
    "circled letters": "say ⓕⓞⓡⓑⓘⓓⓓⓔⓝ now",
    "half full-width, half invisible": "say ｆｏｒ\u200b\u200bbidden now",
}


@pytest.mark.parametrize("text", DISGUISED.values(), ids=DISGUISED.keys())
def test_a_blocked_word_is_found_through_width_compatibility_forms_and_invisible_characters(text):
    """Full-width letters, compatibility forms and invisible characters (zero-width, soft hyphen, bidi
    controls...) let a blocked word past the block-list, which read the text as it came."""
    assert Blocklist("forbidden").scan(text).where == "entry 1 at character 4"


def test_a_ligature_or_compatibility_form_in_the_text_or_the_list_is_matched():
    assert Blocklist("filthy\nrule 1").scan("a ﬁlthy word").where == "entry 1 at character 2"
    assert Blocklist("filthy\nrule 1").scan("see RULE ①").where == "entry 2 at character 4"
    assert Blocklist("ｆｉｌ\u200bthy").scan("a filthy word").where == "entry 1 at character 2"


def test_the_character_named_is_the_clients_after_characters_that_change_length():
    # "① ﬁ" reads "1 fi" (one character longer) and each zero-width space is nothing: the hit is still named
    # at its place in the text the client sent.
    assert Blocklist("bad").scan("① ﬁ bad").where == "entry 1 at character 4"
    assert Blocklist("bad").scan("\u200b\u200b\u200bﬁ bad").where == "entry 1 at character 5"


# Each text shows the word "forbidden" with marks added to its letters: accents, or "zalgo" text (a stack of
# combining marks on each letter, or one drawn through it).
MARKED = {
    "accents": "say fòrbíddén now",
    "accents in capitals": "say FÒRBÍDDÉN now",
    "accents as combining marks": "say fo\u0300rbi\u0301dde\u0301n now",
    "strike-through": "say " + "".join(letter + "\u0337" for letter in "forbidden") + " now",
    "zalgo": "say " + "".join(letter + "\u030d\u0346\u0329\u0489\u035c" for letter in "forbidden") + " now",
    "marks on full-width letters": "say ｆ\u0308ｏ\u0308ｒｂｉｄｄｅｎ now",
    "marks apart from their letters by invisible characters": "say fo\u200b\u0301rbidden\u200d\u0301 now",
}


@pytest.mark.parametrize("text", MARKED.values(), ids=MARKED.keys())
def test_a_blocked_word_is_found_through_accents_and_marks_added_to_its_letters(text):
    """Accents and other combining marks added to a word's letters took it past the block-list: a mark is not a
    word character, and "fòrbíddén" is not "forbidden". The plain form now drops the marks."""
    assert Blocklist("forbidden").scan(text).where == "entry 1 at character 4"


def test_an_entry_with_accents_matches_the_word_without_them_and_the_character_named_is_the_clients():
    blocklist = Blocklist("café noir")

    assert blocklist.scan("un CAFE  noir").where == "entry 1 at character 3"
    assert blocklist.scan("un cafe\u0301\u0301\u0301 noi\u0308r").where == "entry 1 at character 3"
    assert Blocklist("bad").scan("e\u0301\u0301\u0301 z\u0337a\u0337 bad").where == "entry 1 at character 10"
    (problem,) = blocklist_problems("bad\n\u0301\u0337")  # nothing left of it: it would match anywhere
    assert problem.startswith("Line 2:") and "accents" in problem
    (problem,) = blocklist_problems("re:caf[eé]")
    assert "re:caf[ee]" in problem


# Each text shows the word "forbidden" with some of its letters taken from another script that draws them alike.
LOOKALIKES = {
    "a Cyrillic o": "say f\u043erbidden now",
    "Cyrillic o, e": "say f\u043erbidd\u0435n now",
    "a Greek omicron and iota": "say f\u03bfrb\u03b9dden now",
    "Cyrillic capitals": "say FORBIDD\u0415N now",
    "Cyrillic o, i, e": "say f\u043erb\u0456dd\u0435n now",
    "a Cyrillic i under an accent": "say forb\u0457dden now",
}


@pytest.mark.parametrize("text", LOOKALIKES.values(), ids=LOOKALIKES.keys())
def test_a_blocked_word_is_found_through_look_alike_letters_of_other_scripts_in_a_latin_word(text):
    """A Cyrillic "о" or a Greek "ο" in a Latin word took it past the block-list. In a word that mixes Latin letters
    with Cyrillic or Greek ones, those drawn as a Latin letter read as it."""
    assert Blocklist("forbidden").scan(text).where == "entry 1 at character 4"


def test_a_word_all_in_cyrillic_or_greek_is_not_read_as_the_latin_word_it_resembles():
    """Russian "сор" (litter) and "рос" (grew) are drawn like "cop" and "poc": a word wholly of another script is that
    script's word, so an English entry does not refuse Russian or Greek text by accident."""
    blocklist = Blocklist("cop\npoc\nxo")

    assert blocklist.scan("на полу был сор, и он рос") is None
    assert blocklist.scan("СОР") is None
    assert blocklist.scan("όχι, ο χορός") is None
    assert blocklist.scan("the с\u043ep said").where == "entry 1 at character 4"  # Cyrillic but for one "o"
    assert Blocklist("сор").scan("на полу был сор").where == "entry 1 at character 12"


async def test_look_alike_letters_are_read_in_a_stream_whichever_piece_makes_the_word_mixed():
    """The word is read as mixed or not as a whole: its Cyrillic letters may come before its first Latin one."""
    _, guard = guard_for(policy(blocklist="cope"))

    relayed = []
    with pytest.raises(ContentPolicyViolationError) as blocked:
        for piece in ["lorem \u0441\u043e", "\u0440", "e elit"]:
            if await guard.feed(piece):
                relayed.append(piece)
        await guard.finish()

    assert blocked.value.moderation == 'blocked output: blocklist (entry 1 at character 6), policy "p"'
    assert "".join(relayed) == "lorem \u0441\u043e\u0440"  # "сор" so far: a Russian word, not the entry
    _, guard = guard_for(policy(blocklist="cop"))
    for piece in ["на полу ", "был с", "ор", ", и он рос"]:
        assert await guard.feed(piece) is True
    await guard.finish()


@pytest.mark.parametrize("text", ["die STRASSE hier", "die Strasse hier", "die straße hier", "die STRAẞE hier"])
def test_sharp_s_and_double_s_are_one_spelling_in_the_entry_and_in_the_text(text):
    """Full case folding: "ß" is "ss" (its capital too), as German writes it in capitals or where ß is missing; the
    matcher's case folding is simple, and "strasse" took past a list naming "straße" (and the other way round)."""
    assert Blocklist("straße").scan(text).where == "entry 1 at character 4"
    assert Blocklist("STRASSE").scan(text).where == "entry 1 at character 4"
    assert Blocklist("bad").scan("ßß ẞ bad").where == "entry 1 at character 5"  # each ß one character as sent


def test_marks_that_spell_another_letter_outside_the_latin_greek_and_cyrillic_accents_are_kept():
    """Only the combining diacritics are dropped (the marks any script borrows, which accents and zalgo text are
    made of): a Japanese voiced mark or a Devanagari vowel sign spells another word, which an entry must not match."""
    assert Blocklist("ばか").scan("はか") is None  # "idiot" is not "grave"
    assert Blocklist("ばか").scan("ハ ばか").where == "entry 1 at character 2"
    assert Blocklist("कुल").scan("कल") is None


@pytest.mark.parametrize(
    "text",
    [
        "for bidden",
        "for-bidden",
        "for.bidden",
        "for\u00a0bidden",
        "un\u200bforbidden",  # reads "unforbidden": not the word
        "forbidden\u200bness",
        "ｆｏｒｂｉｄｄｅｎｎｅｓｓ",
    ],
)
def test_what_is_not_the_word_is_still_not_matched(text):
    assert Blocklist("forbidden").scan(text) is None


# A word of each script written without spaces, in a sentence that runs it into its neighbours (a zero-width space
# between words, as Thai and Khmer may write, is invisible and dropped).
UNSPACED = {
    "Thai": ("ภาษา", "คนพูดภาษาไทย", 5),
    "Thai, a zero-width space": ("ภาษา", "คนพูด\u200bภาษา\u200bไทย", 6),
    "Lao": ("ພາສາ", "ເວົ້າພາສາລາວ", 5),
    "Khmer": ("ភាសា", "និយាយភាសាខ្មែរ", 5),
    "Myanmar": ("ဘာသာ", "မြန်မာဘာသာစကား", 6),
    "Chinese": ("杀", "我要杀你", 2),
    "Japanese": ("ばか", "おまえはばかだ", 4),
}


@pytest.mark.parametrize(("entry", "text", "at"), UNSPACED.values(), ids=UNSPACED.keys())
def test_an_entry_in_a_script_written_without_spaces_is_found_inside_a_run_of_it(entry, text, at):
    """Thai, Lao, Khmer, Myanmar, Chinese and Japanese put no space between words, so a word there never stood whole
    between boundaries and a list naming it was passed by every sentence holding it (an entry needed a pattern)."""
    assert Blocklist(f"forbidden\n{entry}").scan(text).where == f"entry 2 at character {at}"


def test_only_the_edges_of_an_entry_written_without_spaces_go_without_a_word_boundary():
    blocklist = Blocklist("iPhone手机\nforbidden")

    assert blocklist.scan("买 iPhone手机壳").where == "entry 1 at character 2"  # 手机 runs into 壳
    assert blocklist.scan("买iPhone手机").where == "entry 1 at character 1"  # 买 is no letter of a Latin word
    assert blocklist.scan("xiPhone手机") is None  # the Latin edge is still a word's
    assert blocklist.scan("unforbidden 禁止") is None
    assert blocklist.scan("ภาษ") is None
    assert Blocklist("ภาษา").scan("คนพูดภาษ", final=False) is None
    assert Blocklist("ภาษา").scan("คนพูดภาษา", final=False) is None  # a longer entry may yet follow: held back


@pytest.mark.parametrize(
    "text", ["我要forbidden的东西", "ภาษาforbiddenไทย", "ことばforbiddenです", "我要ｆｏｒｂｉｄｄｅｎ的"]
)
def test_a_latin_word_written_against_a_script_without_spaces_is_a_whole_word(text):
    """Chinese, Japanese or Thai text runs a Latin word into its own letters with no space: a letter of those
    scripts counted as the word's, so "我要forbidden的" went past a list naming "forbidden"."""
    assert Blocklist("forbidden").scan(text) is not None
    assert Blocklist("forbid").scan(text) is None  # the Latin letters around it still make the word longer
    # A window (a stream's next scan) that begins with the word reads the letter before it all the same.
    plain = PlainText(text.split("forbidden")[0] + "forbidden, now")
    assert Blocklist("forbidden").scan_open(plain, start=plain.text.index("forbidden"))[0] is not None


def test_an_entry_that_is_only_invisible_characters_matches_nothing_and_is_refused():
    blocklist = Blocklist("\u200b\u200d\nforbidden")

    assert blocklist.scan("any text at all") is None
    assert blocklist.scan("the forbidden word").where == "entry 2 at character 4"
    (problem,) = blocklist_problems("\u200b\u200d\nforbidden")
    assert problem.startswith("Line 1:") and "invisible" in problem


def test_a_pattern_is_matched_against_the_plain_form_and_one_that_is_not_written_in_it_is_refused():
    blocklist = Blocklist("re:secret\\s+plan")

    assert blocklist.scan("our ＳＥＣＲＥＴ  p\u200blan").where == "entry 1 at character 4"
    (problem,) = blocklist_problems("re:ｓｅｃｒｅｔ")
    assert problem.startswith("Line 1:") and "re:secret" in problem


@pytest.mark.parametrize("text", LOOKALIKES.values(), ids=LOOKALIKES.keys())
def test_a_pattern_meets_look_alike_letters_read_as_latin_and_one_written_with_them_is_refused(text):
    """A pattern reads the text a word or phrase does, look-alikes in a Latin word read as Latin letters: ``forbid\\w+``
    is not passed by "fоrbidden" with a Cyrillic "о". A pattern written with such a letter in a Latin run
    (``fоrbid\\w+``) could therefore never match, and was saved without a word: the admin refuses it, rewritten."""
    assert Blocklist("re:forbid\\w+").scan(text).where == "entry 1 at character 4"
    assert Blocklist("re:\\bforbidden\\b").scan(text).where == "entry 1 at character 4"

    (problem,) = blocklist_problems("re:f\u043erbid\\w+")
    assert problem.startswith("Line 1:") and "(re:forbid\\w+)" in problem
    (problem,) = blocklist_problems("re:FORBIDD\u0415N")
    assert "(re:FORBIDDEN)" in problem
    # Cyrillic between escapes, a class naming both spellings, a Russian word: patterns that can match, taken.
    assert blocklist_problems("re:\\bсор\\b\nre:с[оo]р\nre:\\sпривет\\pL*") == []
    assert Blocklist("re:с[оo]р").scan("на полу был сор").where == "entry 1 at character 12"


async def test_a_pattern_meets_look_alikes_read_as_latin_in_a_stream_whichever_piece_makes_the_word_mixed():
    _, guard = guard_for(policy(blocklist="re:forbid\\w+"))

    relayed = []
    with pytest.raises(ContentPolicyViolationError) as blocked:
        for piece in ["say f", "\u043e", "rbidd", "en now"]:
            if await guard.feed(piece):
                relayed.append(piece)
        await guard.finish()

    assert blocked.value.moderation == 'blocked output: blocklist (entry 1 at character 4), policy "p"'
    assert "forbidd" not in "".join(relayed).replace("\u043e", "o")


@pytest.mark.parametrize("where", ["first", "seam", "last"])
async def test_a_whole_input_is_scanned_in_its_plain_form_however_long(where):
    """The windows are read in the plain form: a character that grows 18-fold (U+FDFA) cannot push a word out
    of a window, and a word stretched by invisible characters across two windows' seam is found."""
    blocklist = Blocklist("forbidden")
    padding = "\ufdfa " * 60_000  # 120,000 characters, 1,140,000 in the plain form
    stretched = "for" + "\u200b" * 5_000 + "bidden"
    seam = SCAN_LIMIT_CHARS - 2_000
    text = {
        "first": "ｆｏｒｂｉｄｄｅｎ " + padding,
        "seam": "lorem " * (seam // 6) + stretched + " " + "lorem " * 40_000,
        "last": padding + " ｆｏｒｂｉｄｄｅｎ",
    }[where]

    hit = await blocklist.scan_whole(text)

    at = {"first": 0, "seam": text.find("for"), "last": len(padding) + 1}[where]
    assert hit is not None and hit.where == f"entry 1 at character {at}"
    assert await blocklist.scan_whole(padding + " ｆｏｒｂｉｄｄｅｎｌｙ") is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("re:(x|y", "not a regular expression"),
        ("re:(a)\\1", "no back-references"),
        ("re:(?<=a)b", "no look-arounds"),
        ("re:foo(?!bar)", "no look-arounds"),
        ("re:a*", "matches empty text"),
        ("re:" + "a" * 301, "at most 300 characters"),
    ],
)
def test_patterns_the_linear_matcher_does_not_take_or_that_match_anything_are_refused(entry, problem):
    (found,) = blocklist_problems(f"fine words\n{entry}")

    assert found.startswith("Line 2:") and problem in found


# Patterns that backtracked for seconds to minutes under Python's re (on 26-40 characters, or a.*c on
# 200,000): accepted now that RE2 matches them in linear time, and still found where they match.
BACKTRACKING = ["(a+)+$", "(\\w*)*x", ".*.*=", "((a+))+b", "(a|aa)+b", "a.*b.*c", "a\\w*c", "x\\w+y[^z]*z"]


def test_patterns_that_backtrack_under_pythons_re_are_taken_and_matched_by_re2():
    entries = "\n".join(f"re:{pattern}" for pattern in BACKTRACKING)
    assert blocklist_problems(entries) == []
    blocklist = Blocklist(entries)
    assert {type(regex).__module__.split(".")[0] for line, regex in blocklist._matchers()} == {"re2"}
    assert blocklist.scan("a" * 40 + "!") is None  # where Python's re took 43 s on (a|aa)+b
    assert blocklist.scan("xx AAAAB") is not None
    assert blocklist.scan("then a, b and C").where == "entry 6 at character 5"  # a.*b.*c, any case


class _TextSizes:
    """A compiled pattern that notes the length of each text it is handed (RE2's bindings encode the whole text to
    UTF-8 at each call, however small the window read in it)."""

    def __init__(self, regex, sizes: list[int]) -> None:
        self.regex, self.sizes = regex, sizes

    def finditer(self, text, *args):
        self.sizes.append(len(text))
        return self.regex.finditer(text, *args)


@pytest.mark.parametrize("text", ["lorem ipsum " * 100_000, "\ufdfa" * 50_000], ids=["ascii", "U+FDFA"])
async def test_a_whole_input_s_patterns_read_a_window_at_a_time(text):
    """Each window of a long input handed its pattern the whole plain form read so far, which RE2's bindings encode
    and measure again at each call: 4 million characters of U+FDFA took 115 s under one pattern (and 30 MB of ASCII
    28 s), the cost growing with the square of the input. Each is handed its window now."""
    blocklist = Blocklist("forbidden\nre:secret\\s+plan")
    sizes: list[int] = []
    blocklist._patterns = [(line, _TextSizes(regex, sizes)) for line, regex in blocklist._patterns]

    hit = await blocklist.scan_whole(text + " secret plan")

    assert hit is not None and hit.where == f"entry 2 at character {len(text) + 1}"
    assert len(sizes) > 3 and max(sizes) <= SCAN_LIMIT_CHARS + blocklist.overlap + 1


async def test_a_whole_input_s_plain_form_is_let_go_of_as_it_is_read():
    """The plain form of the whole input was kept to the end of its scan: U+FDFA is 18 characters in it, so 2 million
    of them (6 MB of a request) held 72 MB, and each window copied all of it again. What the scan has read is let go
    of, its hits still placed in the text as sent."""
    text = "\ufdfa" * 2_000_000 + " forbidden"
    blocklist = Blocklist("forbidden\nre:secret\\s+plan")
    tracemalloc.start()
    try:
        hit = await blocklist.scan_whole(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert hit is not None and hit.where == "entry 1 at character 2000001"
    assert peak < 36 * 2**20  # the plain form of 2 windows of input at most; it was 72 MB and more


def test_sound_patterns_are_accepted():
    assert blocklist_problems("word\nre:\\bcredit\\s+card\\b\nre:\\d{3,4}-\\d+\nre:(?:foo|bar)baz") == []
    assert blocklist_problems("re:foo\\s+bar\\s+baz\nre:(?:ab)+c\nre:(?:cat|dog)s?\nre:[a-z]{2,40}@x") == []


# THE WORDS' TRIE: the words and phrases are one regular expression laid out as a trie, which costs about the same
# whatever the number of entries. It must find exactly what the flat alternation sorted longest first found (the
# matcher until 5 December, kept here as the oracle): the same place, the same (longest) match, the same entry.


def flat_alternation(values: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(_word_pattern(value) for value in sorted(values, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def with_flat_alternation(blocklist: Blocklist) -> Blocklist:
    if blocklist._words_by_line:  # none left: an entry of marks only, which is nothing in the plain form
        blocklist._words = flat_alternation([value for _, value in blocklist._words_by_line])
    return blocklist


# Letters whose cases ``re`` matches across scripts and forms (İ and ı are i, ſ is s, the Kelvin sign is k, ς is σ),
# others that NFKC changes (ǅ, ﬁ, full-width), non-ASCII letters, Cyrillic and Greek look-alikes of "o" (read as it in
# a word that mixes them with Latin letters), a combining mark (dropped), digits, punctuation, and the whitespace a
# phrase's words may be apart by (and a zero-width space, which is not).
LETTERS = "abAB iIİı sSſ kKK ßẞ σςΣ µμ ǅǆǄ ﬁｆ éÉ жЖ оОο \u0301 _1² -.+'".replace(" ", "")
SPACES = " \t\n\u00a0\u2003\u200b"
WORD = st.text(LETTERS, min_size=1, max_size=4)
ENTRIES = st.lists(st.lists(WORD, min_size=1, max_size=3).map(" ".join), min_size=1, max_size=8)


@st.composite
def written(draw, value: str) -> str:
    """An entry as a text may hold it: in another case, its words any whitespace apart."""
    words = value.split()
    spaces = [draw(st.sampled_from(SPACES)) for _ in words[1:]]
    text = "".join(word + space for word, space in zip(words, [*spaces, ""], strict=True))
    return draw(st.sampled_from([text, text.upper(), text.lower(), text.swapcase()]))


@st.composite
def entries_and_text(draw) -> tuple[list[str], str]:
    """Entries, some of them others made longer (a word or phrase and the phrase it begins), and a text made of
    them between letters and whitespace, so that words are found, found inside longer ones, overlap and are
    prefixes of one another."""
    values = draw(ENTRIES)
    longer = draw(st.lists(st.tuples(st.sampled_from(values), st.sampled_from(["", " "]), WORD), max_size=6))
    values = [*values, *(value + between + word for value, between, word in longer)]
    entry = st.sampled_from(values).flatmap(written)
    pieces = draw(st.lists(st.one_of(entry, entry, st.text(LETTERS + SPACES, max_size=3)), max_size=12))
    apart = draw(st.lists(st.sampled_from(["", "", " ", "\n"]), min_size=len(pieces), max_size=len(pieces)))
    return values, "".join(piece + space for piece, space in zip(pieces, apart, strict=True))


PROPERTY = settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@PROPERTY
@given(entries_and_text(), st.data())
@example((["sx", "ſx y"], "SX\t y"), None)
@example((["kill", "KILL THE", "kill the killers"], "kill the killer kill the killers"), None)
@example((["i", "İx", "ıx y"], "IX Y ix"), None)
@example((["ab", "a", "abc d"], "abc abc d ab"), None)
def test_the_trie_finds_what_the_alternation_longest_first_found(case, data):
    values, text = case
    trie, oracle = _words_regex(tuple(values)), flat_alternation(values)
    start = data.draw(st.integers(0, len(text)), "start") if data else 0
    end = data.draw(st.integers(start, len(text)), "end") if data else len(text)

    assert [m.span() for m in trie.finditer(text, start, end)] == [m.span() for m in oracle.finditer(text, start, end)]


@PROPERTY
@given(entries_and_text(), st.booleans(), st.data())
def test_a_blocklist_names_the_same_entry_at_the_same_character_as_with_the_alternation(case, final, data):
    """The whole matcher: the plain form, the entry a hit names (its line) and where, and whether a stream's scan
    leaves a match at the end of the text so far for the next piece."""
    values, text = case
    source = "\n".join(["# house rules", *values, *values[:2]])  # an entry twice: the line named is the same
    blocklist, oracle = Blocklist(source), with_flat_alternation(Blocklist(source))
    plain = PlainText(text, whole=final)
    start = data.draw(st.integers(0, len(plain.text)), "start")

    assert blocklist.scan(text, final=final) == oracle.scan(text, final=final)
    assert blocklist.scan_open(plain, start=start, final=final) == oracle.scan_open(plain, start=start, final=final)


def test_entries_nested_deeper_than_the_trie_and_long_phrases_are_matched_longest_first():
    """The trie is nested groups only so deep (``re`` parses them recursively: a few hundred levels raised
    RecursionError), then an alternation of what is left of each entry, longest first."""
    words = [("w" + "o" * n) for n in range(600)]
    phrase = " ".join(["lorem ipsum"] * 300)
    blocklist = Blocklist("\n".join([*words, phrase, phrase + " dolor", "lorem"]))

    assert blocklist.scan("say w" + "o" * 250 + " now").where == "entry 251 at character 4"
    assert blocklist.scan("say w" + "o" * 250 + "w now") is None
    assert blocklist.scan("w" + "o" * 550 + "!").where == "entry 551 at character 0"
    assert blocklist.scan(f"a {phrase}\t dolor").where == "entry 602 at character 2"
    assert blocklist.scan(f"a {phrase} dolorem").where == "entry 601 at character 2"
    assert blocklist.scan(f"a {phrase[:-1]}").where == "entry 603 at character 2"


# THE REPLY GUARD


def policy(**fields) -> object:
    row = ModerationPolicy(
        pk=fields.pop("pk", 1),
        name="p",
        checker=ModerationChecker.BLOCKLIST,
        **{"stream_interval_chars": 1, "blocklist": "adipiscing", **fields},
    )
    return policy_snapshot(row, None)


def guard_for(*policies) -> tuple[Moderation, ReplyGuard]:
    moderation = Moderation(list(policies), caller=Caller(user_id=1, username="u"), request_id="req_1", model="m")
    guard = moderation.output()
    assert guard is not None
    return moderation, guard


async def test_a_term_split_over_two_pieces_is_found():
    _, guard = guard_for(policy())

    await guard.feed("lorem adip")
    with pytest.raises(ContentPolicyViolationError) as blocked:
        await guard.feed("iscing elit")

    assert blocked.value.code == "content_policy_violation"
    assert blocked.value.moderation == 'blocked output: blocklist (entry 1 at character 6), policy "p"'


async def test_a_piece_ending_in_a_blocked_word_is_held_back_until_the_next_shows_it_whole():
    _, guard = guard_for(policy(stream_interval_chars=5))

    assert await guard.feed("lorem adipi") is True
    assert await guard.feed("scing") is False  # "adipiscing" so far: it may yet be "adipiscingly"
    assert await guard.feed("") is False
    assert await guard.feed("ly") is True  # scanned although under the mark: not the word
    assert await guard.feed(" adipiscing") is False
    with pytest.raises(ContentPolicyViolationError):
        await guard.feed(" elit")


@pytest.mark.parametrize(
    "pieces",
    [
        ["lorem for", "\u200b", "bidden elit"],
        ["lorem ｆｏｒ", "ｂｉｄ", "ｄｅｎ elit"],
        ["lorem for\u00ad", "bid\u00ad", "den elit"],
        ["lorem for", *["\u200b" * 100] * 50, "bidden elit"],  # 5,000 invisible characters between
        ["lorem f\u200bo\u200br\u200bb", "i\u200bd\u200bd\u200be\u200bn", " elit"],
        ["lorem fòrbí", "dde", "\u0301n elit"],
        ["lorem f\u0337o\u0337r\u0337b", "\u0337i\u0337d\u0337d\u0337e\u0337n", "\u0337", "\u0337 elit"],
        ["lorem forbidden", *["\u0301"] * 100, " elit"],  # marks after the word, one a piece
    ],
    ids=[
        "zero-width",
        "full-width",
        "soft-hyphens",
        "long-invisible-run",
        "each-letter",
        "accents",
        "strike-through",
        "marks-after",
    ],
)
async def test_a_disguised_term_split_over_pieces_is_found_and_never_relayed(pieces):
    _, guard = guard_for(policy(blocklist="forbidden"))

    relayed = []
    with pytest.raises(ContentPolicyViolationError) as blocked:
        for piece in pieces:
            if await guard.feed(piece):
                relayed.append(piece)
        await guard.finish()

    assert blocked.value.moderation == 'blocked output: blocklist (entry 1 at character 6), policy "p"'
    assert Blocklist("forbidden").scan("".join(relayed), final=False) is None, "a relayed piece completed the word"


async def test_a_disguised_blocked_word_ending_the_text_so_far_is_held_back():
    _, guard = guard_for(policy(blocklist="forbidden"))

    assert await guard.feed("lorem ｆｏｒｂｉｄｄｅｎ") is False
    assert await guard.feed("\u200b") is False  # still "forbidden" so far: it may yet be "forbiddenly"
    with pytest.raises(ContentPolicyViolationError):
        await guard.feed(" elit")


async def test_a_disguised_word_at_the_end_of_a_reply_is_found_by_the_final_check():
    _, guard = guard_for(policy(blocklist="forbidden"))

    assert await guard.feed("lorem for\u200b") is True
    assert await guard.feed("bidden\u200b") is False
    with pytest.raises(ContentPolicyViolationError):
        await guard.finish()


async def test_a_blocking_blocklist_scans_every_piece_whatever_its_interval():
    _, guard = guard_for(policy(stream_interval_chars=1000))

    with pytest.raises(ContentPolicyViolationError):
        await guard.feed("lorem adipiscing elit")  # under the mark, and still not relayed


async def test_a_long_reply_keeps_only_what_its_scans_read_again_and_still_finds_a_word_at_the_end():
    """The reply's plain form was kept whole and joined anew after every piece, so the check of a reply grew with the
    square of its length (0.35 s of CPU for 200,000 characters). What no scan reads again is let go of: each scan
    reads its overlap back, a flagging block-list from its last mark."""
    blocking = policy(blocklist="forbidden")
    flagging = policy(pk=2, blocklist="adipiscing", stream_interval_chars=1000, action=ModerationAction.FLAG)
    _, guard = guard_for(blocking, flagging)
    piece = "lorem ipsum dolor sit amet, consectetur "  # 40 characters
    held = 0
    for _ in range(5_000):  # 200,000 characters
        assert await guard.feed(piece) is True
        held = max(held, len(guard._choices[0]._plain.text))
    assert held < 1_000 + 2 * len(piece) + 4 * len("adipiscing ")
    await guard.feed("for\u200b")
    with pytest.raises(ContentPolicyViolationError) as blocked:
        await guard.feed("bidden elit")
    assert "entry 1 at character 200000" in blocked.value.moderation


@pytest.mark.django_db(transaction=True)
async def test_a_flagging_blocklist_scans_at_its_marks_and_the_end_scans_the_rest():
    moderation, guard = guard_for(policy(stream_interval_chars=1000, action=ModerationAction.FLAG))

    await guard.feed("lorem adipiscing elit")  # under the mark: not scanned yet
    assert moderation.summary == ""
    await guard.finish()
    await moderation_drain()
    assert moderation.summary.startswith("flagged output: blocklist")


# A tool call's arguments: a JSON text, read decoded (a tool is given the strings it spells).
ARGUMENT_PIECES = {
    "escapes": ['{"q": "\\u0066orbi\\u0064den"}'],
    "escape-split": ['{"q": "\\u00', '66orbidden"}'],
    "backslash-split": ['{"q": "\\', 'u0066orbidden"}'],
    "each-escape-split": ['{"q": "\\', "u", "0", "0", "6", "6", "orbidden", '"}'],
    "surrogate-pair-split": ['{"q": "\\ud835', '\\udc1forbidden"}'],  # 𝐟 (mathematical bold f)
    "line-break": ['{"q": "see\\nforbidden"}'],
    "in-a-key": ['{"\\u0066orbidden": 1}'],
    "solidus": ['{"cmd": "rm -rf \\/"}'],  # "rm -rf /"
}


@pytest.mark.parametrize("pieces", ARGUMENT_PIECES.values(), ids=ARGUMENT_PIECES.keys())
async def test_a_blocked_word_spelt_with_json_escapes_in_a_tool_calls_arguments_is_found(pieces):
    _, guard = guard_for(policy(blocklist="forbidden\nre:rm -rf /"))

    relayed = []
    with pytest.raises(ContentPolicyViolationError):
        for piece in pieces:
            if await guard.feed(piece, call=0):
                relayed.append(piece)
        await guard.finish()

    assert Blocklist("forbidden").scan(decoded("".join(relayed))) is None, "a relayed piece completed the word"


def decoded(text: str) -> str:
    decoder = JsonStrings()
    return decoder.feed(text) + decoder.flush()


def rendered(value) -> str:
    """``value`` as ``json.dumps`` writes it, its strings as they are (what the decoder makes of that text)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{key}": {rendered(item)}' for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(rendered(item) for item in value) + "]"
    return f'"{value}"' if isinstance(value, str) else json.dumps(value)


async def test_a_tool_calls_arguments_ending_in_a_blocked_word_are_held_back():
    _, guard = guard_for(policy(blocklist="forbidden"))

    assert await guard.feed('{"q": "forbidde', call=0) is True
    assert await guard.feed("\\u006", call=0) is True  # not a letter yet
    assert await guard.feed("e", call=0) is False  # "forbidden" so far: it may yet be "forbiddenly"
    assert await guard.feed("ly", call=0) is True
    with pytest.raises(ContentPolicyViolationError):
        await guard.feed(' \\u0066orbidden"}', call=0)


async def test_each_tool_calls_arguments_are_decoded_on_their_own_and_the_text_as_it_is():
    _, guard = guard_for(policy(blocklist="forbidden\nre:\\\\u0066"))

    assert await guard.feed('{"q": "\\u00', call=0) is True
    assert await guard.feed('{"q": "x"}', call=1) is True  # another call's, between: the escape waits
    with pytest.raises(ContentPolicyViolationError) as blocked:
        await guard.feed('66orbidden"}', call=0)
    assert "entry 1" in blocked.value.moderation

    _, guard = guard_for(policy(blocklist="forbidden\nre:\\\\u0066"))
    assert await guard.feed('{"q": "\\u0066"}', call=0) is True  # the tool is given "f"
    with pytest.raises(ContentPolicyViolationError) as blocked:
        await guard.feed(" say \\u0066 plainly")  # the reply's text is read as it is
    assert "entry 2" in blocked.value.moderation


@pytest.mark.parametrize(
    ("arguments", "blocked"),
    [
        ('{"q": "\\u0066orbidden"}', True),
        ('{"q": "\\u0066orbidden"', False),  # not JSON (cut short): read as it is, as before
        ("forbidden", True),
        ('{"q": ["a", {"\\u0062": "\\ud835\\udc1forbidden"}]}', True),
        ('{"q": "\\\\u0066orbidden"}', False),  # an escaped backslash: the tool reads "\u0066orbidden"
    ],
)
async def test_a_whole_replys_tool_call_arguments_are_read_decoded_when_they_are_json(arguments, blocked):
    _, guard = guard_for(policy(blocklist="forbidden"))

    if blocked:
        with pytest.raises(ContentPolicyViolationError):
            await guard.check("clean text", arguments=[arguments])
    else:
        await guard.check("clean text", arguments=[arguments])


# A message from an Anthropic deployment that called a server tool (web search) and an MCP server's tool, as
# Anthropic answers one: the calls' input is the model's words, which the client's tool or MCP server is given.
def anthropic_message(*calls: dict) -> dict:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": "Let me look that up."}, *calls],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 30, "server_tool_use": {"web_search_requests": 1}},
    }


SERVER_AND_MCP_CALLS = {
    "server_tool_use": {
        "type": "server_tool_use",
        "id": "srvtoolu_01",
        "name": "web_search",
        "input": {"query": "\uff46orbidden"},
    },
    "mcp_tool_use": {
        "type": "mcp_tool_use",
        "id": "mcptoolu_01",
        "name": "run",
        "server_name": "shell",
        "input": {"cmd": "forbidden"},
    },
}


@pytest.mark.parametrize("call", SERVER_AND_MCP_CALLS.values(), ids=SERVER_AND_MCP_CALLS.keys())
async def test_a_whole_messages_server_or_mcp_tool_calls_input_is_read_as_a_tool_uses(call):
    _, guard = guard_for(policy(blocklist="forbidden"))
    message = anthropic_message(call)

    with pytest.raises(ContentPolicyViolationError):
        await guard.check(_message_text(message), arguments=_message_arguments(message))


async def test_reasoning_translated_into_thinking_is_read_as_the_models_thinking():
    # An OpenAI-protocol model's reasoning reaches a /v1/messages client as ``thinking``: read as thinking is.
    reply = {"role": "assistant", "reasoning_content": "the forbidden word", "content": "ok"}
    message = message_from_completion({"choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]})
    _, guard = guard_for(policy(blocklist="forbidden"))
    with pytest.raises(ContentPolicyViolationError):
        await guard.check(_message_text(message), arguments=_message_arguments(message))

    translator = EventTranslator()
    chunks = [{"choices": [{"index": 0, "delta": {"reasoning_content": piece}}]} for piece in ("the forb", "idden")]
    chunks.append({"choices": [{"index": 0, "delta": {"content": "ok"}}]})
    events = [event for chunk in chunks for event in translator.feed(chunk)]
    relayed: list[str] = []

    async def upstream():
        for event in events:
            yield event

    _, guard = guard_for(policy(blocklist="forbidden"))
    with pytest.raises(ContentPolicyViolationError):
        async for event in guard.relay(upstream(), _event_pieces):
            relayed.append((event.get("delta") or {}).get("thinking") or "")
    assert "idden" not in "".join(relayed)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=8,
)


@given(JSON_VALUES, st.data())
@settings(max_examples=300, deadline=None)
def test_the_stream_decoder_reads_the_strings_json_loads_reads_however_the_text_is_split(value, data):
    text = json.dumps(value)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    decoder = JsonStrings()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert "".join(decoder.feed(piece) for piece in pieces) + decoder.flush() == rendered(value)


@pytest.mark.django_db(transaction=True)
async def test_a_flag_is_recorded_once_however_often_the_term_comes_back():
    moderation, guard = guard_for(policy(action=ModerationAction.FLAG))

    for piece in ("adipiscing ", "and ", "adipiscing ", "again"):
        await guard.feed(piece)
    await guard.finish()
    await moderation_drain()

    assert moderation.summary == 'flagged output: blocklist (entry 1 at character 0), policy "p"'
    events = [event async for event in AuditEvent.objects.filter(action="moderation.flag")]
    assert [(e.actor_type, e.actor_id, e.target_id) for e in events] == [("user", "1", "req_1")]


def test_an_output_guard_only_when_a_policy_checks_output():
    moderation = Moderation(
        [policy(check_output=False)], caller=Caller(user_id=1, username="u"), request_id="r", model="m"
    )

    assert moderation.output() is None


# THE ADMIN


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def policy_form(**fields) -> dict:
    return {
        "name": "house rules",
        "enabled": "on",
        "checker": "blocklist",
        "action": "block",
        "check_input": "on",
        "check_output": "on",
        "stream_interval_chars": "200",
        "blocklist": "",
        "moderation_model": "omni-moderation-latest",
        "categories": "[]",
        "timeout_seconds": "5.0",
        **fields,
    }


@pytest.mark.django_db
def test_the_admin_refuses_a_pattern_the_matcher_does_not_take_and_saves_a_sound_list(admin_client):
    url = reverse("admin:providers_moderationpolicy_add")

    refused = admin_client.post(url, policy_form(blocklist="fine\nre:(?<!not )bad"))
    saved = admin_client.post(url, policy_form(blocklist="fine\nre:\\bcredit\\s+card\\b"))

    assert refused.status_code == 200
    assert "Line 2: not a regular expression the matcher takes" in refused.content.decode()
    assert saved.status_code == 302
    assert list(ModerationPolicy.objects.values_list("blocklist", flat=True)) == ["fine\nre:\\bcredit\\s+card\\b"]


@pytest.mark.django_db
def test_the_openai_checker_needs_a_provider_in_the_admin(admin_client):
    response = admin_client.post(
        reverse("admin:providers_moderationpolicy_add"), policy_form(checker="openai", blocklist="")
    )

    assert response.status_code == 200
    assert "/v1/moderations" in response.content.decode()
    assert not ModerationPolicy.objects.exists()


@pytest.mark.django_db
def test_a_policy_in_use_cannot_be_deleted_until_nothing_names_it(admin_client):
    """Deleting a policy attached to a plan or a model left them unprotected, and the admin's delete page did not
    say so (the link was simply emptied). The page now names what uses it and refuses; once detached it goes."""
    from billing.models import Plan
    from tests.factories import ModelFactory

    used = ModerationPolicy.objects.create(name="house rules", blocklist="forbidden")
    plan = Plan.objects.create(name="Team", moderation_policy=used)
    model = ModelFactory(name="gpt-guarded", moderation_policy=used)
    url = reverse("admin:providers_moderationpolicy_delete", args=[used.pk])

    page = admin_client.get(url).content.decode()
    assert "Team" in page and "gpt-guarded" in page
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 200  # the page again: nothing deleted
    assert ModerationPolicy.objects.filter(pk=used.pk).exists()

    plan.moderation_policy = None
    plan.save()
    model.moderation_policy = None
    model.save()
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not ModerationPolicy.objects.filter(pk=used.pk).exists()


@pytest.mark.django_db
def test_the_admin_refuses_a_list_of_more_entries_than_it_holds_and_says_how_many(admin_client):
    """A list holds at most 2,000 entries (docs/moderation.md): one more is the form's error, saying how many it has,
    not a server error nor a list cut short; comments and blank lines do not count."""
    url = reverse("admin:providers_moderationpolicy_add")
    words = [f"word{number}" for number in range(2_001)]

    refused = admin_client.post(url, policy_form(blocklist="\n".join(words)))
    saved = admin_client.post(url, policy_form(blocklist="# house rules\n\n" + "\n".join(words[:2_000])))

    assert refused.status_code == 200
    assert "At most 2000 entries (this list has 2001)." in refused.content.decode()
    assert saved.status_code == 302
    assert ModerationPolicy.objects.get().blocklist.count("\n") == 2_001
