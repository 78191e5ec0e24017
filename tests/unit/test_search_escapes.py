r"""FHIR search value escapes (R4 search.html, "Escaping Search Parameters"), storage/search.py:
`split_value` cuts alternatives at the commas no `\` escapes, `split_token` a token at its first
unescaped `|`, `unescape` reads a part's literal text and `escape_value` writes one; the SQL of a
search and the conditional create/update's identifier lookup (`_one_identifier`) read the same."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_kap.storage.search import escape_value, search_sql, split_token, split_value, unescape
from fhir_kap.storage.store import _one_identifier


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("", [""]),
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("s|a,s|b", ["s|a", "s|b"]),
        (r"a\,b", [r"a\,b"]),
        (r"s|a\,b,s|c", [r"s|a\,b", "s|c"]),
        (r"a\\,b", [r"a\\", "b"]),  # an escaped backslash, then a separator
        (r"a\\\,b", [r"a\\\,b"]),  # an escaped backslash, then an escaped comma
        (r"a\x,b", [r"a\x", "b"]),  # a backslash before an ordinary character stays
        ("a\\", ["a\\"]),  # a trailing backslash stays
        (",", ["", ""]),
    ],
)
def test_split_value_cuts_only_at_unescaped_commas(value, parts):
    assert split_value(value) == parts


@pytest.mark.parametrize(
    ("part", "token"),
    [
        ("s|c", ("s", "c")),
        ("c", (None, "c")),
        ("s|", ("s", "")),
        ("|c", ("", "c")),
        ("s|a|b", ("s", "a|b")),  # only the first bar separates
        (r"s|a\,b", ("s", "a,b")),
        (r"x\|y", (None, "x|y")),  # an escaped bar: one code, no system
        (r"s\|t|c", ("s|t", "c")),
        (r"s|c\\", ("s", "c\\")),
        (r"s\\|c", ("s\\", "c")),  # an escaped backslash does not escape the bar after it
        (r"s|m\$n", ("s", "m$n")),
        (r"s|c\d", ("s", r"c\d")),
    ],
)
def test_split_token_unescapes_system_and_code(part, token):
    assert split_token(part) == token


@pytest.mark.parametrize(
    ("part", "text"),
    [("plain", "plain"), (r"a\,b", "a,b"), (r"\\\|\$\,", "\\|$,"), (r"a\b", r"a\b"), ("a\\", "a\\")],
)
def test_unescape(part, text):
    assert unescape(part) == text


def test_escape_value_escapes_the_four_special_characters():
    assert escape_value(r"a,b|c$d\e") == r"a\,b\|c\$d\\e"
    assert escape_value("nothing-special") == "nothing-special"


@given(st.lists(st.text(max_size=12), min_size=1, max_size=5), st.text(max_size=12))
def test_escaped_values_read_back_as_written(values, system):
    joined = ",".join(f"{escape_value(system)}|{escape_value(v)}" for v in values)
    assert [split_token(part) for part in split_value(joined)] == [(system, v) for v in values]


def test_search_sql_matches_the_unescaped_value_and_still_ors():
    _, args = search_sql("Patient", {"identifier": [r"s|a\,b"]})
    assert args == ["Patient", "identifier", "a,b", "s"]
    _, args = search_sql("Patient", {"identifier": ["s|a,s|b"]})
    assert args == ["Patient", "identifier", "a", "s", "b", "s"]
    _, args = search_sql("Patient", {"_id": [r"x\,y,z"]})
    assert args == ["Patient", "x,y", "z"]


def test_search_sql_reads_a_reference_value_unescaped():
    _, args = search_sql("Communication", {"recipient": [r"Practitioner/a\,b"]})
    assert args == ["Communication", "recipient", "a,b", "Practitioner"]


@pytest.mark.parametrize(
    ("condition", "ident"),
    [
        ({"identifier": ["s|v"]}, ("s", "v")),
        ({"identifier": [r"s|a\,b"]}, ("s", "a,b")),
        ({"identifier": [r"s|x\|y"]}, ("s", "x|y")),
        ({"identifier": [r"s|c\\d"]}, ("s", "c\\d")),
        ({"identifier": ["s|a,s|b"]}, None),  # alternatives: a search
        ({"identifier": [r"s|a\\,b"]}, None),  # `a\` OR b: a search, never the code b alone
        ({"identifier": ["v"]}, None),
        ({"identifier": ["s|"]}, None),
        ({"identifier": ["|v"]}, None),
        ({"identifier": ["s|v"], "_id": ["x"]}, None),
        ({"identifier": ["s|v", "s|w"]}, None),
    ],
)
def test_one_identifier_reads_the_condition_as_the_search_does(condition, ident):
    assert _one_identifier(condition) == ident
