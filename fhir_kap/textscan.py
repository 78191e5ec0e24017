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

__all__ = ["turns"]

_NON_SPACE = re.compile(r"\S")


def turns(text: str, label: re.Pattern[str], *, after_sentences: bool = False,
          enough: int | None = None) -> list[re.Match[str]]:
    """The matches `finditer` of `(?m)(?:^|(?<=[.!?]\\s))\\s*` + `label` would give (without the
    sentence part unless `after_sentences`), stopping after `enough` matches.

    `label` is matched where the leading whitespace ends; it must not match at whitespace
    itself (a label begins with a letter), which is what makes the shortcut exact.
    """
    starts = {0}
    marks = ".!?\n" if after_sentences else "\n"
    for mark in marks:  # str.find runs at C speed; these marks are few in any note
        i = text.find(mark)
        while i >= 0:
            if mark == "\n":
                starts.add(i + 1)
            elif text[i + 1:i + 2].isspace():  # what `\s` matches in a str pattern
                starts.add(i + 2)
            i = text.find(mark, i + 1)
    found: list[re.Match[str]] = []
    end = 0  # matches do not overlap: a start inside the previous match is skipped
    run_end = -1  # the label position reached from the last start: whitespace up to it
    failed = -1  # a label position already tried without a match
    for pos in sorted(starts):
        if pos < end:
            continue
        if pos > run_end:
            m = _NON_SPACE.search(text, pos)
            run_end = m.start() if m else len(text)
        if run_end == failed:
            continue
        got = label.match(text, run_end)
        if got is None:
            failed = run_end
            continue
        found.append(got)
        if enough is not None and len(found) >= enough:
            break
        end = got.end()
    return found
