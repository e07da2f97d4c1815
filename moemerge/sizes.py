"""Byte sizes as users write them (`128MB`, `4GB`, `512MiB`) and as we print them."""

from __future__ import annotations

import re

from moemerge.errors import ConfigError

__all__ = ["parse_size", "parse_kmb", "format_size"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size", minimum: int = 1) -> int:
    """Parse `"128MB"` -> 128_000_000, `"1GiB"` -> 1_073_741_824; ints pass through.

    Raises ConfigError naming `what` when the text is not a size or is below `minimum`.
    """
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a size like '128MB' or '4GB', got {text!r}")
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{what}: expected a size like '128MB', '4GB' or '512MiB', got {text!r}"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < minimum:
        raise ConfigError(
            f"{what}: {format_size(value)} is below the minimum {format_size(minimum)}"
        )
    return value


_KMB = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_kmb(text: str | int) -> int:
    """MergeKit's sizes (`--out-shard-size`, mergekit/common.py `parse_kmb`): an integer with an
    optional K, M or B suffix meaning thousands, millions or billions of bytes, so `"1B"` ->
    1_000_000_000 (one billion bytes, not one byte), `"500M"` -> 500_000_000, `"123"` -> 123.

    Raises ConfigError (a ValueError) on anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip()
    unit = s[-1:].lower() if s[-1:].isalpha() else ""
    digits = s[:-1] if unit else s
    if unit not in _KMB or not digits.isdigit():
        raise ConfigError(f"--out-shard-size: expected an integer with an optional K, M or B suffix "
                          f"(thousands, millions, billions of bytes; MergeKit's units), e.g. 5B or 500M, got {text!r}")
    return int(digits) * _KMB[unit]


def format_size(n: float) -> str:
    """1_500_000_000 -> '1.50 GB' (decimal units, as disks and clouds count)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
