"""The transcript rule's fast linear scan agrees with its one-regex definition, over thousands of
generated texts (property tests: pure, but too many examples for the unit tier's budget)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kap.fhir.textscan import looks_like_transcript

_PIECES = [
    "client",
    "Therapist",
    "T",
    "c",
    "pt",
    "Dr. Lee",
    "dr  x",
    "Q:",
    "A:",
    "P:",
    "me",
    "word",
    ":",
    " ",
    "\n",
    "\r",
    "\t",
    ".",
    "!",
    "?",
    "\x85",
    "\u2028",
    "\u00a0",
    "[00:12:31]",
]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30).map("".join))
def test_transcript_scan_counts_exactly_what_the_speaker_pattern_finds(text: str) -> None:
    """The fast scan (turn starts found with str.find) agrees with the one-regex definition."""
    from fhir_kap.fhir.textscan import SPEAKER, SPEAKER_AT, SPEAKER_TURN, TIMESTAMP, turns

    assert len(turns(text, SPEAKER_AT, after_sentences=True)) == len(SPEAKER.findall(text))
    record_rule = [m.group(1).lower() for m in SPEAKER_TURN.finditer(text)]
    expected = (
        bool(TIMESTAMP.search(text))
        or len(SPEAKER.findall(text)) >= 2
        or (
            len(record_rule) >= 2
            and any(w in ("client", "therapist", "patient", "clinician") for w in record_rule)
        )
    )
    assert looks_like_transcript(text) is expected


_RECORD_PIECES = [
    "client",
    "Client",
    "therapist",
    "Mary",
    "Jo B.",
    "x",
    ":",
    ": ",
    " ",
    "\n",
    "\t",
    "\r",
    "\x85",
    "\u2028",
    "\u00a0",
    ".",
    "A",
]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_RECORD_PIECES), max_size=30).map("".join))
def test_record_transcript_scan_finds_what_the_turn_pattern_finds(text: str) -> None:
    """The KAP-record check (fhir_kap.records.inputs) through the same linear scan."""
    from fhir_kap.fhir.textscan import SPEAKER_TURN as _SPEAKER_TURN
    from fhir_kap.fhir.textscan import TURN_LABEL as _TURN_LABEL
    from fhir_kap.fhir.textscan import turns

    assert [m.group(1) for m in turns(text, _TURN_LABEL)] == [
        m.group(1) for m in _SPEAKER_TURN.finditer(text)
    ]
