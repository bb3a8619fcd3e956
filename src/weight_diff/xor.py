"""XOR diff families: files, not tensors. OpenAssistant published each file of its model XORed byte for byte with
the raw LLaMA file of the same name (``xor_codec.py``); XORing again with that raw file gives the publisher's file.

The result is only right when the raw files are byte-identical to the ones the publisher converted (same
transformers conversion, same shards): every output file's MD5 and SHA-256 are checked against the checksum list
the payload carries, when it carries one, and a mismatch says whether the raw file or the payload is to blame.

>>> plan = plan_xor(Path("oasst-sft-6-llama-30b-xor"), Path("llama30b_hf"))
>>> report = apply_xor(plan, Path("oasst-sft-6-llama-30b"))
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .errors import IntegrityError, UsageError
from .files import CONFIG_NAME, write_atomic
from .manifest import SUMS_NAME, format_sums
from .writer import FILE_MODE, PARTIAL_SUFFIX

CHUNK = 16 * 2**20
CLEAR_FILES = ("added_tokens.json",)  # shipped in clear and copied, as xor_codec.py does
# Files of a hub clone that are not part of the payload: never XORed, never required from raw.
NOT_PAYLOAD = re.compile(r"(README(\.md)?|\.gitattributes|LICEN[CS]E.*|.*\.(md5|sha256|chk|txt)|SHA256SUMS)$", re.I)
_SUM_LINE = re.compile(r"^\s*([0-9a-fA-F]{64}|[0-9a-fA-F]{32})\s+\*?(?:\S*/)?([^/\s]+)\s*$")


@dataclass(frozen=True)
class XorFile:
    """One output file: the payload file XORed with the raw file of the same name (None: copied in clear)."""

    name: str
    payload: Path
    raw: Path | None
    size: int


@dataclass(frozen=True)
class XorPlan:
    """Every file the run writes, and the checksums the payload lists by file name (MD5 or SHA-256)."""

    files: tuple[XorFile, ...]
    listed: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(item.size for item in self.files)


@dataclass(frozen=True)
class XorReport:
    """What an XOR recovery wrote and which files matched the publisher's checksum list."""

    files: int
    bytes_written: int
    checked: tuple[str, ...]  # files whose output hash is in the payload's list
    unlisted: tuple[str, ...]  # files the list does not name (or no list at all)


def looks_xor(directory: Path) -> str | None:
    """Return why ``directory`` looks like an XOR payload (its config.json is not JSON), None otherwise."""
    config = directory / CONFIG_NAME
    if not config.is_file():
        return None
    data = config.read_bytes()[:64].lstrip()
    if data.startswith(b"{"):
        return None
    return f"{CONFIG_NAME} is not JSON: every file is XOR-encoded against the raw model's file of the same name"


def plan_xor(payload: Path, raw: Path) -> XorPlan:
    """Return the files to XOR, refusing before any write when raw lacks one.

    Sizes may differ (a tuned model with added tokens has larger shards): as ``xor_codec.py`` does, a shorter raw
    file is read as if padded with zero bytes, a longer one is cut. Only the checksums can tell a wrong raw file.
    """
    files, missing = [], []
    for path in sorted(payload.iterdir()):
        if not path.is_file() or path.name.startswith(".") or NOT_PAYLOAD.fullmatch(path.name):
            continue
        size = path.stat().st_size
        if path.name in CLEAR_FILES:
            files.append(XorFile(path.name, path, None, size))
            continue
        base = raw / path.name
        if not base.is_file():
            missing.append(path.name)
        else:
            files.append(XorFile(path.name, path, base, size))
    if missing:
        raise UsageError(
            f"{raw}: lacks {len(missing)} file(s) the XOR payload needs (first: {missing[0]}); XOR needs the raw "
            "model's files exactly as the publisher converted them, with the same names and shards"
        )
    return XorPlan(files=tuple(files), listed=read_listed_sums(payload))


def read_listed_sums(directory: Path) -> dict[str, frozenset[str]]:
    """Return the MD5/SHA-256 checksums that files in ``directory`` list (model card, ``*.md5``, ``SHA256SUMS``)."""
    listed: dict[str, set[str]] = {}
    for path in directory.iterdir():
        if not path.is_file() or not NOT_PAYLOAD.fullmatch(path.name) or path.stat().st_size > 2**20:
            continue
        for line in path.read_text(errors="replace").splitlines():
            match = _SUM_LINE.match(line)
            if match:
                listed.setdefault(match.group(2), set()).add(match.group(1).lower())
    return {name: frozenset(hashes) for name, hashes in listed.items()}


def apply_xor(plan: XorPlan, out: Path, progress: Callable[[int], None] = lambda n: None) -> XorReport:
    """Write each planned file into ``out`` (``config.json`` last), checking it against the listed checksums.

    Refuses, leaving nothing that loads as a model, at the first file whose output hash is not listed when its
    name is: with the raw file's own hash, the message says which side is not the publisher's.
    """
    payload_buffer = numpy.empty(CHUNK, dtype=numpy.uint8)
    raw_buffer = numpy.empty(CHUNK, dtype=numpy.uint8)
    sums: dict[str, str] = {}
    checked, unlisted = [], []
    for item in sorted(plan.files, key=lambda f: f.name == CONFIG_NAME):  # config.json last
        hashes = _write_one(item, out, payload_buffer, raw_buffer, progress)
        sums[item.name] = hashes["output"][1]
        listed = plan.listed.get(item.name)
        if not listed:
            unlisted.append(item.name)
            continue
        if listed & set(hashes["output"]):
            checked.append(item.name)
            continue
        (out / item.name).unlink()
        (out / CONFIG_NAME).unlink(missing_ok=True)
        if item.raw is not None and listed & set(hashes["raw"]):
            raise IntegrityError(
                f"{item.payload}: the raw file matched the publisher's list but the XOR result does not: the payload "
                "file is damaged; download it again. Nothing that loads as a model was written"
            )
        raise IntegrityError(
            f"{item.name}: the result is not the publisher's file (its MD5/SHA-256 is not in the list the payload "
            f"carries); the raw file {item.raw} is not byte-identical to the one the publisher converted (or the "
            "payload is damaged). Nothing that loads as a model was written"
        )
    write_atomic(out / SUMS_NAME, format_sums(dict(sorted(sums.items()))).encode())
    return XorReport(len(plan.files), plan.total_size, tuple(checked), tuple(unlisted))


def _write_one(
    item: XorFile, out: Path, payload_buffer, raw_buffer, progress: Callable[[int], None]
) -> dict[str, tuple[str, str]]:
    """Stream one file through XOR into ``out`` under a partial name; return (md5, sha256) of raw and output."""
    target = out / item.name
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    digests = {side: (hashlib.md5(), hashlib.sha256()) for side in ("raw", "output")}
    try:
        with open(item.payload, "rb") as payload, open(partial, "wb") as written:
            os.fchmod(written.fileno(), FILE_MODE)
            raw = open(item.raw, "rb") if item.raw is not None else None  # noqa: SIM115 (closed below)
            try:
                while True:
                    got = payload.readinto(memoryview(payload_buffer))
                    if not got:
                        break
                    data = payload_buffer[:got]
                    if raw is not None:
                        base = raw_buffer[:got]
                        have = _read_full(raw, base)
                        base[have:] = 0  # raw shorter than the payload: zero bytes, as xor_codec.py pads
                        for digest in digests["raw"]:
                            digest.update(base[:have])
                        numpy.bitwise_xor(data, base, out=data)
                    for digest in digests["output"]:
                        digest.update(data)
                    written.write(data)
                    progress(got)
            finally:
                if raw is not None:
                    raw.close()
            written.flush()
            os.fdatasync(written.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {side: (md5.hexdigest(), sha.hexdigest()) for side, (md5, sha) in digests.items()}


def _read_full(source, buffer) -> int:
    """Fill ``buffer`` from ``source`` until it is full or the file ends; return the bytes read."""
    view, done = memoryview(buffer), 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def prepare_output(out: Path, *, overwrite: bool) -> None:
    """Create ``out`` (emptied first with ``overwrite``)."""
    if overwrite and out.is_dir():
        (out / CONFIG_NAME).unlink(missing_ok=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
