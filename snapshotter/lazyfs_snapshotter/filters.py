"""containerd's filter syntax, for List: ``kind==committed,labels."a.b"~=^x``.

A filter is selectors joined by ``,`` (all must match); List's filters match if any does.
A selector is a field path (``name``, ``parent``, ``kind``, ``labels.KEY``; parts may be
quoted) alone (present and non-empty) or followed by ``==``, ``!=`` or ``~=`` (regex) and a
value (bare, ``"quoted"`` or ``/regex/``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InvalidArgument

# A function giving a field path's value on one item (None: absent).
Adaptor = Callable[[Sequence[str]], str | None]

_BARE_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_BARE_VALUE = re.compile(r"[^\s,\"/]+")
_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None
    value: str
    regex: re.Pattern[str] | None

    def matches(self, adaptor: Adaptor) -> bool:
        got = adaptor(self.path)
        if self.op is None:
            return bool(got)
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        assert self.regex is not None
        return got is not None and self.regex.search(got) is not None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {what} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def quoted(self, close: str) -> str:
        self.pos += 1  # opening quote
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                # In /regex/ keep escapes for re; in "..." unescape.
                out.append(ch + nxt if close == "/" and nxt != "/" else nxt)
                self.pos += 2
                continue
            if ch == close:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.error("unterminated quote")

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(0)


def _selector(sc: _Scanner) -> Selector:
    path: list[str] = []
    while True:
        sc.skip_space()
        path.append(sc.quoted('"') if sc.peek('"') else sc.match(_BARE_FIELD, "a field name"))
        if not sc.peek("."):
            break
        sc.pos += 1
    sc.skip_space()
    op = next((o for o in _OPERATORS if sc.peek(o)), None)
    if op is None:
        return Selector(tuple(path), None, "", None)
    sc.pos += 2
    sc.skip_space()
    if sc.peek('"'):
        value = sc.quoted('"')
    elif sc.peek("/"):
        value = sc.quoted("/")
    else:
        value = sc.match(_BARE_VALUE, "a value")
    regex = None
    if op == "~=":
        try:
            regex = re.compile(value)
        except re.error as e:
            raise sc.error(f"bad regular expression ({e})") from None
    return Selector(tuple(path), op, value, regex)


def parse_filter(text: str) -> list[Selector]:
    """Selectors of one filter string (all must match)."""
    sc = _Scanner(text)
    selectors = [_selector(sc)]
    sc.skip_space()
    while not sc.done():
        if not sc.peek(","):
            raise sc.error("expected ','")
        sc.pos += 1
        selectors.append(_selector(sc))
        sc.skip_space()
    return selectors


def parse_filters(texts: Sequence[str]) -> list[list[Selector]]:
    """Parsed filters (any must match); empty strings are ignored."""
    return [parse_filter(t) for t in texts if t.strip()]


def match_any(filters: list[list[Selector]], adaptor: Adaptor) -> bool:
    if not filters:
        return True
    return any(all(s.matches(adaptor) for s in f) for f in filters)
