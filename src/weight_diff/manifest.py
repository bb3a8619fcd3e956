"""Checksums: the publisher's manifest of tensor hashes inside a diff, and ``SHA256SUMS`` beside every output.

Tensor hashes are SHA-256 over the tensor's bytes, C-contiguous and little-endian, in the dtype named beside the
hash, so they do not depend on sharding, file format or tool version. ``SHA256SUMS`` uses the format that
``sha256sum -c`` reads, so anyone can check a copy without this tool.

>>> manifest = Manifest.load("diff-dir")          # None for a diff made without one
>>> manifest.tensors["lm_head.weight"].result.sha256
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import COMPACT_SUFFIX
from .errors import IntegrityError
from .untrusted import SMALL_FILE_LIMIT, load_json, read_small, resolves_inside

MANIFEST_NAME = "weight-diff-manifest.json"
MANIFEST_FORMAT = "weight-diff-manifest"
MANIFEST_VERSION = 1
SUMS_NAME = "SHA256SUMS"
RECOVERY_NAME = "weight-diff-recovery.json"  # in a recovered model: which diff, and whether it was verified
HASH_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class Digest:
    """The SHA-256 of one tensor's bytes, with the dtype and shape those bytes had."""

    dtype: str
    shape: list[int]
    sha256: str | None  # None: not hashed (the raw tensors of a compact diff: its blocks carry checksums)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Digest:
        """Return the digest of a whole tensor (tests and small tensors; the pipeline hashes in blocks)."""
        hasher = hashlib.sha256(tensor_bytes(tensor.contiguous()))
        return cls(dtype_name(tensor.dtype), list(tensor.shape), hasher.hexdigest())


@dataclass(frozen=True)
class TensorRecord:
    """What the publisher saw for one tensor: the raw it was made against, the diff stored, the recovered result.

    A compact diff records no ``diff`` (its blocks carry their own checksums) and no ``raw`` for a tensor with no
    raw counterpart; its ``result`` is the tuned tensor itself, in its own dtype.
    """

    raw: Digest | None
    diff: Digest | None
    result: Digest

    @classmethod
    def from_dict(cls, body: dict) -> TensorRecord:
        raw, diff = (Digest(**body[part]) if body.get(part) is not None else None for part in ("raw", "diff"))
        return cls(raw=raw, diff=diff, result=Digest(**body["result"]))


@dataclass
class Manifest:
    """A diff's promise: for each tensor, the hashes that a correct recovery meets."""

    rules: dict
    tool: dict
    tensors: dict[str, TensorRecord] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # SHA-256 of the diff's config and companion files

    def to_json(self) -> str:
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "hash": {"algorithm": "sha256", "bytes": "C-contiguous, little-endian, in the dtype given"},
            "rules": self.rules,
            "tool": self.tool,
            "tensors": {name: asdict(record) for name, record in self.tensors.items()},
        }
        if self.files:
            body["files"] = dict(sorted(self.files.items()))
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest | None:
        """Return the manifest in ``directory``, or None when the diff has none (2023 diffs).

        Every field is type-checked here, so a damaged or hostile manifest is one clear refusal, never a crash later.
        """
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        where = f"{path}: unreadable manifest"
        if not resolves_inside(path.parent, path):
            raise IntegrityError(f"{path}: a link to {path.resolve()}, outside {path.parent}; refused")
        body = load_json(read_small(path, limit=SMALL_FILE_LIMIT, what="manifest", error=IntegrityError),
                         where=where, error=IntegrityError)  # fmt: skip
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise IntegrityError(f"{where} (not a weight-diff manifest); download it again")
        if body.get("version") != MANIFEST_VERSION:
            raise IntegrityError(
                f"{where} (version {str(body.get('version'))[:20]}; this tool reads version {MANIFEST_VERSION}); "
                "download it again or update weight-diff"
            )
        tensors, rules, tool = body.get("tensors"), body.get("rules"), body.get("tool")
        if not isinstance(tensors, dict) or not isinstance(rules, dict) or not isinstance(tool, dict):
            raise IntegrityError(f"{where} (tensors, rules and tool must be JSON objects); download it again")
        records = {}
        for name, record in tensors.items():
            if not is_tensor_record(record):
                raise IntegrityError(f"{where} (the entry for tensor {name[:100]} is malformed); download it again")
            records[name] = TensorRecord.from_dict(record)
        files = body.get("files", {})
        if not isinstance(files, dict) or not all(_is_sha256(v) for v in files.values()):
            raise IntegrityError(f"{where} (its files section is malformed); download it again")
        if "files" in rules and not _is_compact_file_list(rules["files"]):
            raise IntegrityError(f"{where} (rules.files must list the diff's .wdc file names); download it again")
        return cls(rules=rules, tool=tool, tensors=records, files=files)

    @property
    def compact_files(self) -> list[str] | None:
        """The ``.wdc`` files a compact diff's manifest names (checked when loaded), None where it names none."""
        return self.rules.get("files")


def _is_compact_file_list(names: object) -> bool:
    """Whether a JSON value lists ``.wdc`` files by plain names, each once, at least one."""
    return (
        isinstance(names, list)
        and bool(names)
        and all(isinstance(n, str) and n.endswith(COMPACT_SUFFIX) and "/" not in n and "\\" not in n
                and not n.startswith(".") for n in names)
        and len(set(names)) == len(names)
    )  # fmt: skip


def is_tensor_record(record: object) -> bool:
    """Return whether a JSON value has the shape of a manifest's tensor entry: a result digest, and raw and diff
    digests or null (a compact diff stores no diff, and no raw hash for rows it added)."""
    if not isinstance(record, dict) or set(record) != {"raw", "diff", "result"} or record["result"] is None:
        return False
    for part, digest in record.items():
        if digest is None:
            continue
        if not isinstance(digest, dict) or set(digest) != {"dtype", "shape", "sha256"}:
            return False
        shape, sha = digest["shape"], digest["sha256"]
        if not isinstance(digest["dtype"], str) or not (_is_sha256(sha) or (sha is None and part == "raw")):
            return False
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            return False
    return True


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a contiguous tensor's bytes without a copy (the machine is little-endian, as the hashes require)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def file_sha256(path: Path) -> str:
    """Return a file's SHA-256, reading the next chunk into a reused buffer while the current one is hashed."""
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str | hashlib._Hash) -> str:
    """Return a file's hex digest by ``algorithm`` ("sha256", or "md5" for Meta's checklist.chk).

    ``algorithm`` may also be a hasher already fed a prefix (the hub's git blob id: sha1 seeded with ``blob N\\0``).
    """
    hasher = hashlib.new(algorithm) if isinstance(algorithm, str) else algorithm
    buffers = [bytearray(HASH_CHUNK), bytearray(HASH_CHUNK)]
    with path.open("rb", buffering=0) as file, ThreadPoolExecutor(1) as reader:
        left = os.fstat(file.fileno()).st_size  # never past the stated size: /proc and growing files end here

        def read(buffer: bytearray) -> int:
            return file.readinto(memoryview(buffer)[: min(left, HASH_CHUNK)]) if left else 0

        pending = reader.submit(read, buffers[0])
        turn = 0
        while size := pending.result():
            left -= size
            current = memoryview(buffers[turn])[:size]
            turn ^= 1
            pending = reader.submit(read, buffers[turn])
            hasher.update(current)
    return hasher.hexdigest()


def format_sums(sums: dict[str, str]) -> str:
    r"""Return ``SHA256SUMS`` text: one ``<hex>  <file>`` line a file, sorted, as ``sha256sum`` writes it.

    As coreutils does, a name holding a backslash, newline or carriage return is escaped (``\\``, ``\n``,
    ``\r``) and its line starts with a backslash, so that every name reads back exactly.
    """
    lines = []
    for name, digest in sorted(sums.items()):
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        prefix = "\\" if escaped != name else ""
        lines.append(f"{prefix}{digest}  {escaped}\n")
    return "".join(lines)


_UNESCAPE = {"\\": "\\", "n": "\n", "r": "\r"}


def read_sums(path: Path) -> dict[str, str]:
    """Return {file name: SHA-256} from a ``SHA256SUMS`` in coreutils' format (text ``"  "`` or binary ``" *"``
    lines, escaped names), refusing lines that are not."""
    if not resolves_inside(path.parent, path):
        raise IntegrityError(f"{path}: a link to {path.resolve()}, outside {path.parent}; refused")
    try:
        text = read_small(path, limit=SMALL_FILE_LIMIT, what=SUMS_NAME, error=IntegrityError).decode()
    except UnicodeDecodeError:
        raise IntegrityError(f"{path}: not UTF-8 text, so not a {SUMS_NAME} file weight-diff wrote") from None
    sums = {}
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        digest, mode, name = body[:64], body[64:66], body[66:]
        name = _unescape(name) if escaped else name
        if len(digest) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digest) or mode not in ("  ", " *"):
            raise IntegrityError(f"{path}:{number}: not a sha256sum line: {line[:80]!r}")
        if name is None or not name:
            raise IntegrityError(f"{path}:{number}: a badly escaped file name: {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def _unescape(name: str) -> str | None:
    out, chars = [], iter(name)
    for char in chars:
        if char == "\\":
            char = _UNESCAPE.get(next(chars, ""))
            if char is None:
                return None
        out.append(char)
    return "".join(out)
