"""Numbers from outside input are ASCII digits (fhir/, layer 0: base; imports nothing of ours).

`str.isdigit()` also takes superscripts and circled digits (`²`, `①`), which `int()` refuses (a
500 where a 400 was due), and `int()` reads other scripts' digits (`٣` as 3) and refuses more
than 4,300 digits at all. One rule for every room that reads a number from a request, a header,
a record or another server's answer: 1 to `most` ASCII digits (18 stays below SQLite's 2**63).
"""

from __future__ import annotations

__all__ = ["ascii_digits"]


def ascii_digits(text: str, most: int = 18) -> bool:
    """Whether `text` is 1 to `most` ASCII digits (nothing else, no sign, no space).

    >>> ascii_digits("120"), ascii_digits("\\u00b2"), ascii_digits("\\u0663"), ascii_digits(""), ascii_digits("9" * 19)
    (True, False, False, False, False)
    """
    return 0 < len(text) <= most and text.isascii() and text.isdigit()
