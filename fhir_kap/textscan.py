"""Linear-time scans for speaker turns ("Client: ...") at line or sentence starts.

A pattern like `(?m)^\\s*(client|...)\\s*:` run with `finditer` is quadratic on hostile text: at
every line start its `\\s*` runs over all the whitespace that follows, so a note of 20,000
blank lines and two colons took 26 s. `turns` finds the same non-overlapping matches in time
linear in the text: every candidate start inside one whitespace run leads to the same first
non-whitespace character, where the label must begin, so each run is crossed once and each
label position is tried once.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["iter_turns", "turns"]

_NON_SPACE = re.compile(r"\S")
#: Sentence punctuation and the one whitespace after it; a turn may start right after.
_SENTENCE_END = re.compile(r"[.!?]\s")


def turns(text: str, label: re.Pattern[str], *, after_sentences: bool = False,
          enough: int | None = None) -> list[re.Match[str]]:
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


def iter_turns(text: str, label: re.Pattern[str], *, after_sentences: bool = False) -> Iterator[re.Match[str]]:
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
