"""Linear-time scans for speaker turns ("Client: ...") at line or sentence starts, and the one
rule both the KAP-record check and the FHIR profile check use to tell a transcript from a note.

A pattern like `(?m)^\\s*(client|...)\\s*:` run with `finditer` is quadratic on hostile text: at
every line start its `\\s*` runs over all the whitespace that follows, so a note of 20,000
blank lines and two colons took 26 s. `turns` finds the same non-overlapping matches in time
linear in the text: every candidate start inside one whitespace run leads to the same first
non-whitespace character, where the label must begin, so each run is crossed once and each
label position is tried once.

Room: fhir/ (layer 0, base): may import errors, config, jsonio and fhir/ only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["iter_turns", "looks_like_transcript", "turns"]

_NON_SPACE = re.compile(r"\S")
#: Sentence punctuation and the one whitespace after it; a turn may start right after.
_SENTENCE_END = re.compile(r"[.!?]\s")


def turns(
    text: str, label: re.Pattern[str], *, after_sentences: bool = False, enough: int | None = None
) -> list[re.Match[str]]:
    """The matches `finditer` of `(?m)(?:^|(?<=[.!?]\\s))\\s*` + `label` would give (without the
    sentence part unless `after_sentences`), stopping after `enough` matches.

    `label` is matched where the leading whitespace ends; it must not match at whitespace
    itself (a label begins with a letter), which is what makes the shortcut exact.
    """
    found: list[re.Match[str]] = []
    for got in iter_turns(text, label, after_sentences=after_sentences):
        found.append(got)
        if enough is not None and len(found) >= enough:
            break
    return found


def iter_turns(
    text: str, label: re.Pattern[str], *, after_sentences: bool = False
) -> Iterator[re.Match[str]]:
    """`turns`, one match at a time. Memory does not grow with the text, and a whitespace run is
    skipped in one step: every start inside it leads to the label position already tried."""
    find = text.find
    size = len(text)
    line = find("\n")  # the next newline at or after the scan position (-1: none left)
    sentence = _SENTENCE_END.search(text) if after_sentences else None
    pos = 0  # the text's start is always a turn start
    end = 0  # matches do not overlap: the next start is at or after the previous match's end
    failed = -1  # a label position already tried without a match
    while True:
        if pos < size and not text[pos].isspace():
            at = pos  # where the label must begin, from any start up to it
        else:
            m = _NON_SPACE.search(text, pos)
            at = m.start() if m else size
        if at != failed:
            got = label.match(text, at)
            if got is None:
                failed = at
            else:
                yield got
                end = got.end()
        floor = max(at + 1, end)  # the next start that could lead anywhere new
        if 0 <= line < floor - 1:
            line = find("\n", floor - 1)
        if sentence is not None and sentence.end() < floor:
            sentence = _SENTENCE_END.search(text, floor - 2)
        after_line = line + 1 if line >= 0 else size + 1
        after_sentence = sentence.end() if sentence is not None else size + 1
        pos = min(after_line, after_sentence)
        if pos > size:
            return


#: Clinical speaker labels (`Client:`, `T:`, `Pt:`, `Q:`, `Dr Lee:`), counted at line or sentence
#: starts. Not `A:` or `P:`: a SOAP note's Assessment and Plan lines are a note, not a transcript
#: (a Q/A or T/P exchange still shows two `Q:` or `T:` turns).
_LABEL = (
    r"(?:client|therapist|patient|pt|t|c|q|me|clinician|counsell?or|interviewer|"
    r"facilitator|guide|dr\.?\s+[a-z][\w'-]*)\s*:"
)
SPEAKER_AT = re.compile(_LABEL, re.I)
#: The definition of those turns as one regex (quadratic on hostile input: `turns` finds the same).
SPEAKER = re.compile(r"(?:^|(?<=[.!?]\s))\s*" + _LABEL, re.I | re.M)
#: Any name-like turn label at a line start followed by speech (`Mary: ...`, `Jo B.: ...`).
TURN_LABEL = re.compile(r"(client|therapist|patient|clinician|[A-Z][a-z]+ ?[A-Z]?\.?)\s*:\s+\S")
#: Its one-regex definition (quadratic on hostile input: `turns` finds the same).
SPEAKER_TURN = re.compile(r"(?m)^\s*" + TURN_LABEL.pattern)
_SPEAKER_WORDS = ("client", "therapist", "patient", "clinician")
TIMESTAMP = re.compile(r"\[\d{1,2}:\d{2}:\d{2}(?:\.\d+)?\]")


def looks_like_transcript(text: str) -> bool:
    """True when a text reads as a session transcript rather than a summary note: a bracketed
    timestamp (`[00:12:31]`); or two clinical speaker labels (client, therapist, patient,
    clinician, counsellor, interviewer, facilitator, guide, `T:`, `C:`, `Pt:`, `Q:`, `Me:`,
    `Dr Lee:`) at the start of a line or sentence; or two turn lines (`Mary: ...`) of which one
    label is Client, Therapist, Patient or Clinician. Linear in the text.

    >>> looks_like_transcript("Client: I felt calm.\\nTherapist: Tell me more.")
    True
    >>> looks_like_transcript("Mary: it was bright.\\nClient: yes.")
    True
    >>> looks_like_transcript("Integration going well. Client: stable, sleeping better.")
    False
    >>> looks_like_transcript("S: sleeping better.\\nO: calm.\\nA: stable.\\nP: one more session.")
    False
    """
    if text.count(":") < 2:  # each sign below needs two colons
        return False
    if TIMESTAMP.search(text):
        return True
    if len(turns(text, SPEAKER_AT, after_sentences=True, enough=2)) >= 2:
        return True
    n, speaker = 0, False
    for m in iter_turns(text, TURN_LABEL):  # stops as soon as the answer is known
        n += 1
        speaker = speaker or m.group(1).lower() in _SPEAKER_WORDS
        if speaker and n >= 2:
            return True
    return False
