r"""FHIR search values as FHIR R4 escapes them (fhir/, layer 0: base; imports nothing of ours).

search.html, "Escaping Search Parameters": in a search value `,` separates alternatives (OR), a
token's first `|` separates its system from its code, and a `\` before one of `\ , $ |` makes
that character literal: `identifier=s|a\,b` is the one value `a,b`, never `a\` or `b`. One
reading for every room: the store's search and conditions (storage/search.py, store.py), the
conditional references inside resources (fhir/references.py) and the queries the client builds
from data (client/bundles.py). A `\` before any other character (which the spec calls illegal)
is kept as a literal `\`, so a value that carries one means what it says.
"""

from __future__ import annotations

import re

__all__ = ["escape_value", "split_token", "split_value", "token_value", "unescape"]

#: One escape (a `\` and the character after it) or a separator: what `_cut` looks for.
_ESCAPE_OR = {
    ",": re.compile(r"\\.|,", re.DOTALL),
    "|": re.compile(r"\\.|\|", re.DOTALL),
}
#: An escaped special character: `\` before `\`, `,`, `$` or `|`.
_ESCAPED = re.compile(r"\\([\\,$|])")
#: A character a literal value must escape.
_SPECIAL = re.compile(r"([\\,$|])")


def _cut(value: str, separator: str, most: int | None = None) -> list[str]:
    """`value` cut at the `separator`s no backslash escapes (at most `most` cuts), escapes kept."""
    if "\\" not in value:
        return value.split(separator, -1 if most is None else most)
    parts: list[str] = []
    start = 0
    for m in _ESCAPE_OR[separator].finditer(value):
        if m.group() == separator:
            parts.append(value[start : m.start()])
            start = m.end()
            if most is not None and len(parts) == most:
                break
    parts.append(value[start:])
    return parts


def split_value(value: str) -> list[str]:
    r"""A search value's alternatives (OR'ed): cut at every `,` no `\` escapes, each part with
    its escapes kept (`unescape` or `split_token` reads it). An empty value is one empty
    alternative.

    >>> split_value(r"s|a\,b,s|c")
    ['s|a\\,b', 's|c']
    """
    return _cut(value, ",")


def split_token(part: str) -> tuple[str | None, str]:
    r"""One token alternative as (system, code), both unescaped: `system|code`, `system|` (code
    ''), `|code` (system '') or a bare `code` (system None); the first `|` no `\` escapes
    separates them.

    >>> split_token(r"http://x|a\|b\,c")
    ('http://x', 'a|b,c')
    """
    cut = _cut(part, "|", 1)
    if len(cut) == 1:
        return None, unescape(cut[0])
    return unescape(cut[0]), unescape(cut[1])


def unescape(part: str) -> str:
    r"""The literal text of one part of a search value: the `\` before a `\`, `,`, `$` or `|` is
    dropped; any other `\` (the spec calls it illegal) is kept as it is.

    >>> unescape(r"a\\\,b\x")
    'a\\,b\\x'
    """
    return _ESCAPED.sub(r"\1", part) if "\\" in part else part


def escape_value(text: str) -> str:
    r"""`text` as one literal search value (each `\`, `,`, `$` and `|` after a `\`): what a query
    built from data (an identifier's system or value) must use.

    >>> escape_value("a,b|c")
    'a\\,b\\|c'
    """
    return _SPECIAL.sub(r"\\\1", text)


def token_value(system: str, code: str) -> str:
    r"""The search value selecting exactly the token `system|code` (both escaped): the condition a
    query built from data (an identifier) must use.

    >>> token_value("http://x", "a,b")
    'http://x|a\\,b'
    """
    return f"{escape_value(system)}|{escape_value(code)}"
