"""Byte counts as people write and read them: ``5GB``/``2GiB`` in, ``3.85 GB`` out.

Its own module, free of torch, so that every message that states a size (and the CLI before a job runs) shares one
spelling.
"""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def format_size(nbytes: int) -> str:
    """Return a byte count for people: ``3.85 GB``, or ``0.54 MB`` below a gigabyte."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def parse_size(size: str | int) -> int:
    """Return a byte count from ``5GB``, ``500MB``, ``2GiB`` or a plain integer (Hugging Face's spelling)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    nbytes = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]) if match else 0
    if nbytes < 1:  # also "0.1B": no shard can hold less than a byte
        raise UsageError(f"--max-shard-size {size}: expected a size such as 5GB, 500MB or 2GiB")
    return nbytes
