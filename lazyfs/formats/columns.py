"""What the TOC's entry table (formats/toc.py) and the store's chunk lists (formats/chunklist.py)
both keep their columns with: numbers in the narrowest array that holds them, and ``sha256:``
digests as 32 bytes each."""

from __future__ import annotations

import binascii
import sys
from array import array
from collections.abc import Iterable

SHA256_PREFIX = "sha256:"
# What stands for "no digest": no sha256 is all zeros (a collision as hard as any other).
NO_DIGEST = bytes(32)


def narrow(numbers: Iterable[int]) -> array[int]:
    """``numbers`` in the narrowest array type that holds them all: how many low bytes any
    of them uses read from the bytes of the array (in C), not number by number.  A negative
    number uses its top byte: such a column stays as it is (an array("q") if not given as
    an array)."""
    if not isinstance(numbers, array):
        numbers = array("q", numbers)
    size, count = numbers.itemsize, len(numbers)
    if not count or sys.byteorder != "little":
        return numbers
    raw = numbers.tobytes()
    unused = bytes(count)
    used = size
    while used > 1 and raw[used - 1 :: size] == unused:
        used -= 1
    for code in ("B", "H", "I"):
        width = array(code).itemsize
        if used <= width < size:
            low = bytearray(width * count)
            for j in range(width):
                low[j::width] = raw[j::size]
            return array(code, bytes(low))
    return numbers


def raw_sha256(digests: list[str]) -> bytes | None:
    """Every digest as 32 bytes (none, ``""``, as :data:`NO_DIGEST`) when each one given is
    ``sha256:`` and 64 lower-case hex digits, not all 0; else None (such a list keeps its
    strings).  In C, over the digests joined (a mount of 100k files waits for this): each is
    71 characters, the prefix is where every 71st character starts, and the rest is hex that
    spells itself again."""
    zero = SHA256_PREFIX + NO_DIGEST.hex()  # spelt out in a TOC, it keeps the strings
    if zero in digests:
        return None
    spelt = [d or zero for d in digests]
    if spelt and set(map(len, spelt)) != {71}:
        return None
    joined, n = "".join(spelt), len(spelt)
    if any(joined[j::71] != c * n for j, c in enumerate(SHA256_PREFIX)):
        return None
    try:
        text = bytearray(joined.encode("ascii"))
    except UnicodeEncodeError:
        return None
    # The prefix cut out of each digest, a column at a time from its last character (C).
    for j in reversed(range(len(SHA256_PREFIX))):
        del text[j :: 65 + j]
    try:
        raw = binascii.unhexlify(text)
    except binascii.Error:
        return None
    return raw if binascii.hexlify(raw) == text else None  # also refuses upper case


def sha256_text(raw: bytes) -> str:
    """A digest :func:`raw_sha256` packed, spelt again (``""`` for :data:`NO_DIGEST`)."""
    return "" if raw == NO_DIGEST else SHA256_PREFIX + raw.hex()


class RawDigests:
    """Digests spelt ``sha256:<hex>`` (or none) as 32 bytes each, where the strings take 120:
    ``self[i]`` spells digest ``i`` again."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw  # what raw_sha256 made

    def __getitem__(self, i: int) -> str:
        return sha256_text(self.raw[32 * i : 32 * i + 32])
