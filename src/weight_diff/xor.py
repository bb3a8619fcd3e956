"""XOR diff families: files, not tensors. XORing the payload again with the same key gives the publisher's files.

- OpenAssistant (``xor_codec.py``): each file XORed byte for byte with the raw LLaMA file of the same name, a
  shorter raw file zero-padded, a longer one cut; ``added_tokens.json`` in clear.
- BELLE (``models/decrypt.py``): each ``NAME.<sha256>.enc`` starts with the 32-byte SHA-256 of the result; the rest
  is XORed, 10 MiB chunk by 10 MiB chunk, with Meta's ``consolidated.00.pth`` read in 10 MiB chunks from the start
  again when it ends (a short last key chunk repeated to the data chunk's length).

The result is only right when the raw files are byte-identical to the ones the publisher converted (same
transformers conversion, same shards): every output file's MD5 and SHA-256 are checked against the checksum list
the payload carries, when it carries one, and a mismatch says whether the raw file or the payload is to blame.
No tensor value is read, so NaN or Inf in the result is not warned about (unlike recover's other paths): the bytes
are the publisher's, and looking would be a second pass over the written model.

>>> plan = plan_xor(Path("oasst-sft-6-llama-30b-xor"), Path("llama30b_hf"))
>>> report = apply_xor(plan, Path("oasst-sft-6-llama-30b"))
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .checkpoint import COMPACT_SUFFIX
from .errors import IntegrityError, UsageError
from .files import CONFIG_NAME
from .manifest import MANIFEST_NAME
from .writer import FILE_MODE, PARTIAL_SUFFIX, fsync_directory

CHUNK = 16 * 2**20
BELLE_CHUNK = 10 * 2**20  # decrypt.py's data and key chunk: the keystream depends on it
BELLE_KEY = "consolidated.00.pth"
_BELLE_NAME = re.compile(r"(.+)\.([0-9a-f]{64})\.enc")
CLEAR_FILES = ("added_tokens.json",)  # shipped in clear and copied, as xor_codec.py does
# Files of a hub clone that are not part of the payload: never XORed, never required from raw.
CONFIG_READ = 2**20
WEIGHT_NAME = re.compile(r"(pytorch_model|model)(-\d+-of-\d+)?\.(bin|safetensors)")
NOT_PAYLOAD = re.compile(r"(README(\.md)?|\.gitattributes|LICEN[CS]E.*|.*\.(md5|sha256|chk|txt)|SHA256SUMS)$", re.I)
_SUM_LINE = re.compile(r"^\s*([0-9a-fA-F]{64}|[0-9a-fA-F]{32})\s+\*?(?:\S*/)?([^/\s]+)\s*$")


@dataclass(frozen=True)
class XorFile:
    """One output file: the payload file XORed with the raw file of the same name (None: copied in clear)."""

    name: str
    payload: Path
    raw: Path | None
    size: int
    codec: str = "same-name"  # or "belle": a SHA-256 header, then XOR with a cycling key file


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
    sums: dict[str, str]  # each written file's SHA-256, for SHA256SUMS


def looks_xor(directory: Path) -> str | None:
    """Return why ``directory`` looks like an XOR payload (its config.json is not JSON), None otherwise.

    A config.json that is empty or blank (a download that failed), or one beside weight files that open as they
    are (a zip or a safetensors header: XOR-encoded ones do not) or beside a compact diff's files or manifest, is a
    damaged file, not a payload: the reader then says so, where an XOR recovery would write a broken model and
    report success. One of zero bytes is a payload's (a config XORed with an identical one) only beside weight
    files that do not open.
    """
    config = directory / CONFIG_NAME
    if not config.is_file() or (directory / MANIFEST_NAME).is_file():  # a manifest: a diff of weight-diff's own
        return None
    with config.open("rb") as file:  # a config is small; more than that is not one, and is not read whole
        data = file.read(CONFIG_READ)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):  # JSON, perhaps after a byte-order mark
        return None
    names = [p for p in directory.iterdir() if p.suffix == COMPACT_SUFFIX or WEIGHT_NAME.fullmatch(p.name)]
    if not data.strip() or any(p.suffix == COMPACT_SUFFIX or _plain_weights(p) for p in names):
        return None
    if not data.strip(b"\0") and not names:  # zeros: a config XORed with an identical one, or a failed download
        return None
    return f"{CONFIG_NAME} is not JSON: every file is XOR-encoded against the raw model's file of the same name"


def _plain_weights(path: Path) -> bool:
    """Whether a model's weight file (``WEIGHT_NAME``: others, such as ``training_args.bin``, may ship in clear in a
    payload) opens as it is: a torch zip (``PK\\x03\\x04``) or safetensors (a JSON header after its 8-byte
    length). XOR-encoded against the raw file, those first bytes come out zero."""
    if not path.is_file():
        return False
    with path.open("rb") as file:
        head = file.read(9)
    return head.startswith(b"PK\x03\x04") if path.name.endswith(".bin") else head[8:9] == b"{"


def looks_belle(directory: Path, names: Iterable[str] | None = None) -> str | None:
    """Return why ``directory`` looks like a BELLE payload (``NAME.<sha256>.enc`` files), None otherwise.

    ``names``: the payload's file names when not all of its files are here yet (a hub repository's listing)."""
    names = names if names is not None else frozenset(p.name for p in directory.iterdir())
    found = sorted(name for name in names if _BELLE_NAME.fullmatch(name))
    return f"holds {len(found)} NAME.<sha256>.enc file(s) (first: {found[0]})" if found else None


def detect_files(directory: Path, names: Iterable[str] | None = None) -> tuple[str, str] | None:
    """Return (codec, why) when ``directory`` is an XOR payload, None when its files may be read as weights;
    ``names`` as for :func:`looks_belle` (an OpenAssistant payload is told by its config.json, a small file)."""
    reason = looks_belle(directory, names)
    if reason:
        return "belle", reason
    reason = looks_xor(directory)
    return ("same-name", reason) if reason else None


def plan_for(codec: str, payload: Path, raw: Path) -> XorPlan:
    """Return the plan of the codec's files (refusing missing raw files before any write)."""
    return {"same-name": plan_xor, "belle": plan_belle}[codec](payload, raw)


def plan_belle(payload: Path, raw: Path) -> XorPlan:
    """Return BELLE's files to decode with Meta's ``consolidated.00.pth`` (``raw`` is that file or its folder)."""
    key = raw / BELLE_KEY if raw.is_dir() else raw
    if not key.is_file():
        raise UsageError(
            f"{raw}: no {BELLE_KEY}; BELLE's payload is decoded with Meta's original LLaMA-7B {BELLE_KEY}, "
            "byte-identical as Meta distributed it"
        )
    files = []
    for path in sorted(payload.iterdir()):
        match = _BELLE_NAME.fullmatch(path.name)
        if match and path.is_file():
            files.append(XorFile(match.group(1), path, key, path.stat().st_size - 32, codec="belle"))
    listed = {item.name: frozenset({_BELLE_NAME.fullmatch(item.payload.name).group(2)}) for item in files}
    return XorPlan(files=tuple(files), listed=listed)


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


def apply_xor(
    plan: XorPlan,
    out: Path,
    progress: Callable[[int], None] = lambda n: None,
    *,
    done: dict[str, str] | None = None,
    on_file: Callable[[str, str], None] = lambda name, sha256: None,
) -> XorReport:
    """Write each planned file into ``out`` (``config.json`` last), checking it against the listed checksums; the
    caller writes ``SHA256SUMS`` from the report.

    ``done``: files an interrupted run already wrote and checked (name -> SHA-256), kept as they are;
    ``on_file(name, sha256)`` hears of each file once it is in place and checked (the journal of --resume).
    Refuses, leaving nothing that loads as a model, at the first file whose output hash is not listed when its
    name is: with the raw file's own hash, the message says which side is not the publisher's.
    """
    done = done or {}
    payload_buffer = numpy.empty(max(CHUNK, BELLE_CHUNK), dtype=numpy.uint8)
    raw_buffer = numpy.empty(max(CHUNK, BELLE_CHUNK), dtype=numpy.uint8)
    sums: dict[str, str] = {}
    checked, unlisted = [], []
    for item in sorted(plan.files, key=lambda f: f.name == CONFIG_NAME):  # config.json last
        listed = plan.listed.get(item.name)
        if item.name in done:  # checked by the run that wrote it, and still hashing as it did then
            sums[item.name] = done[item.name]
            (checked if listed else unlisted).append(item.name)
            progress(item.size)
            continue
        hashes = _write_one(item, out, payload_buffer, raw_buffer, progress)
        sums[item.name] = hashes["output"][1]
        if not listed:
            unlisted.append(item.name)
            on_file(item.name, sums[item.name])
            continue
        if listed & set(hashes["output"]):
            checked.append(item.name)
            on_file(item.name, sums[item.name])
            continue
        (out / item.name).unlink()
        (out / CONFIG_NAME).unlink(missing_ok=True)
        if item.codec == "belle":
            raise IntegrityError(
                f"{item.payload.name}: the decoded file's SHA-256 is not the one the file carries: {item.raw} is not "
                "Meta's original LLaMA-7B consolidated.00.pth byte for byte (or the payload is damaged). Nothing "
                "that loads as a model was written"
            )
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
    return XorReport(len(plan.files), plan.total_size, tuple(checked), tuple(unlisted), sums)


def _write_one(
    item: XorFile, out: Path, payload_buffer, raw_buffer, progress: Callable[[int], None]
) -> dict[str, tuple[str, str]]:
    """Stream one file through XOR into ``out`` under a partial name; return (md5, sha256) of raw and output."""
    target = out / item.name
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    digests = {side: (hashlib.md5(), hashlib.sha256()) for side in ("raw", "output")}
    chunk = BELLE_CHUNK if item.codec == "belle" else CHUNK
    try:
        with open(item.payload, "rb") as payload, open(partial, "wb") as written:
            os.fchmod(written.fileno(), FILE_MODE)
            if item.codec == "belle":
                payload.seek(32)  # the result's SHA-256, checked against the listed one
            key = _Key(item) if item.raw is not None else None
            try:
                while True:
                    got = _read_full(payload, payload_buffer[:chunk])
                    if not got:
                        break
                    data = payload_buffer[:got]
                    if key is not None:
                        base = raw_buffer[:got]
                        read = key.fill(base)
                        for digest in digests["raw"]:
                            digest.update(read)
                        numpy.bitwise_xor(data, base, out=data)
                    for digest in digests["output"]:
                        digest.update(data)
                    written.write(data)
                    progress(got)
            finally:
                if key is not None:
                    key.close()
            written.flush()
            os.fdatasync(written.fileno())
        os.replace(partial, target)
        fsync_directory(target.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {side: (md5.hexdigest(), sha.hexdigest()) for side, (md5, sha) in digests.items()}


class _Key:
    """The bytes a payload chunk is XORed with, read from the raw file as the family's script read them."""

    def __init__(self, item: XorFile) -> None:
        self.codec = item.codec
        self.file = open(item.raw, "rb")  # noqa: SIM115 (closed by close())
        self.scratch = numpy.empty(BELLE_CHUNK, dtype=numpy.uint8) if self.codec == "belle" else None

    def fill(self, base) -> memoryview:
        """Fill ``base`` with the key for the next payload chunk; return the raw bytes read (for hashing)."""
        if self.codec == "belle":
            have = _read_full(self.file, self.scratch)
            if not have:  # the key file ended: start again from its beginning
                self.file.seek(0)
                have = _read_full(self.file, self.scratch)
            base[:] = numpy.resize(self.scratch[:have], len(base))  # a short key chunk repeats, as decrypt.py's
            return memoryview(self.scratch[:have])
        have = _read_full(self.file, base)
        base[have:] = 0  # raw shorter than the payload: zero bytes, as xor_codec.py pads
        return memoryview(base[:have])

    def close(self) -> None:
        self.file.close()


def _read_full(source, buffer) -> int:
    """Fill ``buffer`` from ``source`` until it is full or the file ends; return the bytes read."""
    view, done = memoryview(buffer), 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            break
        done += got
    return done
