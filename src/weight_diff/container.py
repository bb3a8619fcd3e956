"""The compact diff's file: per-block payloads streamed to disk, then an index that tools can list.

Layout of a ``.wdc`` file (versions 1, 2 and 3 differ only in how a block's bytes are laid out, codec.py), all
integers little-endian::

    b"WDCOMPCT"                       8 bytes, magic
    payload, payload, ...             one zstd frame per block of rows (see codec.py), back to back
    index                             UTF-8 JSON, below
    index length                      8 bytes
    b"WDCOMPCT"                       8 bytes, magic again

The index sits at the end, as in zip and Parquet, because compressed sizes are known only once a block is
written: the writer streams and never holds more than a block. A reader takes the last 16 bytes, then the JSON::

    {"format": "weight-diff-compact", "version": 3,
     "codec": {"transform": "xor", ...},
     "tensors": {"model.embed_tokens.weight": {
         "dtype": "bfloat16", "shape": [32001, 5120], "raw_dtype": "float16", "raw_rows": 32000,
         "blocks": [[row_start, row_stop, offset, size], ...]}}}

``raw_rows`` rows are coded against the raw model; the rest (added vocabulary rows, and every row of a tensor
with no raw counterpart, ``raw_dtype`` null) are coded against zero, that is stored as they are.

>>> with ContainerReader(path) as reader:
...     for name, entry in reader.tensors.items():
...         payload = reader.read_block(entry.blocks[0])
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import codec
from .checkpoint import COMPACT_SUFFIX, DIRECT_ALIGN, TensorInfo, shape_row_numel, shape_rows
from .errors import IntegrityError
from .untrusted import load_json
from .writer import PartialFile

MAGIC = b"WDCOMPCT"
FORMAT = "weight-diff-compact"
VERSION = codec.VERSION  # written; every version in READS is read
READS = (1, 2, 3)
SUFFIX = COMPACT_SUFFIX
# weight-diff writes about 40 bytes of index a block of 2M values (1.4 MB for a 70B model): an index claiming more
# than this is not one it wrote, and is refused before it is read into memory.
MAX_INDEX_BYTES = 256 * 2**20
# The largest blocks any version wrote: version 1 took 4M values a block, later ones 2M, or one row where a row is
# larger. Rows are capped too: a row is one unit of memory on every lane, and no model has one near this size.
MAX_BLOCK_VALUES = 4 * 2**20
MAX_ROW_VALUES = 16 * 2**20
_TRAILER = struct.Struct("<Q8s")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of one tensor, stored as ``size`` bytes at ``offset`` of the file."""

    start: int
    stop: int
    offset: int
    size: int


@dataclass(frozen=True)
class CompactTensor:
    """One tensor of a compact file: what it decodes to and where its blocks are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    raw_dtype: torch.dtype | None  # None: no raw counterpart, every row stored as it is
    raw_rows: int
    blocks: tuple[Block, ...]
    file: Path
    version: int  # the file's format version: how its blocks are laid out (codec.py)

    @property
    def rows(self) -> int:
        return shape_rows(self.shape)

    @property
    def row_numel(self) -> int:
        return shape_row_numel(self.shape)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape of the raw tensor its first ``raw_rows`` rows were coded against."""
        return (self.raw_rows, *self.shape[1:]) if self.shape else ()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ContainerWriter:
    """Writes one compact file under a ``.partial`` name; ``finish`` appends the index, syncs and renames.

    ``sha256`` is the whole file's, for SHA256SUMS: the caller hashes each block's payload with ``hash_block``, in
    block order, before ``finish`` (on a lane of its own: behind the disk writes, the hash held make-diff of a
    float32 tune back, 6.7-7.2 s against 7.4-7.8 s).
    """

    def __init__(self, directory: Path, file_name: str, codec: dict) -> None:
        self._codec = codec
        self._tensors: dict[str, dict] = {}
        self._blocks: list[list[int]] = []
        self.sha256 = hashlib.sha256()
        # O_DIRECT where allowed: buffered writes cost a core of kernel time. Failures are kept (writer.py).
        self._file = PartialFile(directory, file_name, kind="file")
        self.path = self._file.path
        self._write(MAGIC)

    def begin_tensor(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], raw_dtype: torch.dtype | None, raw_rows: int
    ) -> None:
        """Start a tensor; its blocks follow, in row order."""
        self._blocks = []
        self._tensors[name] = {
            "dtype": _dtype_name(dtype),
            "shape": list(shape),
            "raw_dtype": _dtype_name(raw_dtype) if raw_dtype is not None else None,
            "raw_rows": raw_rows,
            "blocks": self._blocks,
        }

    def add_block(self, start: int, stop: int, payload: bytes | memoryview) -> None:
        """Append the payload of rows ``start:stop`` of the current tensor."""
        self._blocks.append([start, stop, self._file.written, len(payload)])
        self._file.write(payload)

    def hash_block(self, payload: bytes | memoryview) -> None:
        """Add a block's payload to the file's hash (in the order the blocks were added)."""
        self.sha256.update(payload)

    def finish(self) -> None:
        """Write the index and trailer, flush to disk, and give the file its final name."""
        self._file.raise_if_failed()
        index = {"format": FORMAT, "version": VERSION, "codec": self._codec, "tensors": self._tensors}
        body = json.dumps(index, separators=(",", ":")).encode()
        self._write(body + _TRAILER.pack(len(body), MAGIC))
        self._file.finish()

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha256.update(data)

    def abort(self) -> None:
        """Close and remove the unfinished file; safe to call twice."""
        self._file.abort()


def _checked(entry: CompactTensor) -> CompactTensor:
    """Return ``entry`` when its shape and blocks are ones weight-diff writes, else raise ValueError (a damaged or
    hostile index): blocks cover the rows in order, each within the size any version wrote, so nothing downstream
    allocates or writes more than the index's rows say."""
    if any(n < 0 for n in entry.shape) or not 0 <= entry.raw_rows <= entry.rows:
        raise ValueError(f"tensor {entry.name} has shape {list(entry.shape)} and {entry.raw_rows} raw rows")
    if entry.raw_dtype is None and entry.raw_rows:
        raise ValueError(f"tensor {entry.name} has raw rows but no raw dtype")
    if entry.row_numel > MAX_ROW_VALUES:
        raise ValueError(f"tensor {entry.name} has rows of {entry.row_numel} values, more than weight-diff writes")
    most = max(MAX_BLOCK_VALUES // max(entry.row_numel, 1), 1)  # rows a block may hold
    expected = 0
    for block in entry.blocks:
        if block.start != expected or not 0 < block.stop - block.start <= most:
            raise ValueError(f"tensor {entry.name}: block of rows {block.start}:{block.stop} out of order or size")
        expected = block.stop
    if expected != entry.rows or entry.raw_rows not in {b.start for b in entry.blocks} | {entry.rows}:
        raise ValueError(f"tensor {entry.name}: its blocks do not cover its {entry.rows} rows as coded")
    return entry


class ContainerReader:
    """An open compact file: its index, and blocks read on demand with ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._direct = _open_direct(path)
        try:
            self.codec, self.tensors = self._read_index()
        except BaseException:
            self.close()
            raise

    def _read_index(self) -> tuple[dict, dict[str, CompactTensor]]:
        return read_index(
            self.path, os.fstat(self._fd).st_size, lambda offset, length: os.pread(self._fd, length, offset)
        )

    def read_block(self, block: Block, out: torch.Tensor | None = None) -> bytes | memoryview:
        """Return one block's payload: a view into ``out`` when it is page-aligned and large enough.

        Into ``out`` the read bypasses the page cache (O_DIRECT), as the model reads do: payloads are read once.
        """
        truncated = f"{self.path}: ends inside a block (truncated download?); download it again"
        start = block.offset - block.offset % DIRECT_ALIGN
        end = -(-(block.offset + block.size) // DIRECT_ALIGN) * DIRECT_ALIGN
        fits = out is not None and out.data_ptr() % DIRECT_ALIGN == 0 and end - start <= out.numel()
        if self._direct is not None and fits:
            view = memoryview(out.numpy()).cast("B")
            done, need = 0, block.offset + block.size - start
            try:
                while done < need:
                    got = os.preadv(self._direct, [view[done : end - start]], start + done)
                    if got == 0:
                        raise IntegrityError(truncated)
                    done += got
                return view[block.offset - start : block.offset - start + block.size]
            except OSError as exc:  # O_DIRECT accepted at open, refused on read: read buffered from now on
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self._direct)
                self._direct = None
        data = os.pread(self._fd, block.size, block.offset)
        if len(data) != block.size:
            raise IntegrityError(truncated)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def __enter__(self) -> ContainerReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_index(
    path: Path,
    size: int,
    read_at: Callable[[int, int], bytes],
    *,
    where: str | None = None,
    remedy: str = "download it again",
) -> tuple[dict, dict[str, CompactTensor]]:
    """Return a compact file's codec and tensors from its ``size`` and ``read_at(offset, length)``: a local file's
    bytes, or ranged reads of a file on the hub, planned before it downloads (``where`` names it in a refusal,
    ``remedy`` says what to do: a file on the hub is its publisher's to fix)."""
    where = where or str(path)
    damaged = f"{where}: not a complete weight-diff compact file (truncated or damaged); {remedy}"
    if size < len(MAGIC) + _TRAILER.size or read_at(0, len(MAGIC)) != MAGIC:
        raise IntegrityError(damaged)
    length, magic = _TRAILER.unpack(read_at(size - _TRAILER.size, _TRAILER.size))
    if magic != MAGIC or length > size - len(MAGIC) - _TRAILER.size:
        raise IntegrityError(damaged)
    if length > MAX_INDEX_BYTES:
        raise IntegrityError(
            f"{where}: its index claims {length} bytes, more than weight-diff writes (at most "
            f"{MAX_INDEX_BYTES}): not a compact file weight-diff wrote, or damaged; {remedy}"
        )
    start = size - _TRAILER.size - length
    try:
        try:
            index = load_json(read_at(start, length), where=f"{where}: its index is damaged", error=IntegrityError)
        except IntegrityError as exc:  # its advice is for a local file
            raise IntegrityError(str(exc).removesuffix("download it again") + remedy) from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError("not a weight-diff compact index")
        version = index.get("version")
        if version not in READS or isinstance(version, bool):
            raise IntegrityError(
                f"{where}: compact format version {str(version)[:20]}; this weight-diff reads versions "
                f"{', '.join(map(str, READS))}: upgrade weight-diff"
            )
        if not isinstance(index["tensors"], dict):
            raise ValueError("its tensors are not a table")
        tensors = {}
        for name, body in index["tensors"].items():
            blocks = tuple(Block(*map(int, block)) for block in body["blocks"])
            if any(b.offset < len(MAGIC) or b.size < 0 or b.offset + b.size > start for b in blocks):
                raise ValueError(f"block of {name} outside the file")
            raw_dtype = body["raw_dtype"]
            tensors[name] = _checked(CompactTensor(
                name=name,
                dtype=DTYPES[body["dtype"]],
                shape=tuple(int(n) for n in body["shape"]),
                raw_dtype=DTYPES[raw_dtype] if raw_dtype is not None else None,
                raw_rows=int(body["raw_rows"]),
                blocks=blocks,
                file=path,
                version=version,
            ))  # fmt: skip
        return index["codec"], tensors
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{where}: its index is damaged ({exc}); {remedy}") from None


def _open_direct(path: Path) -> int | None:
    """Return a descriptor of ``path`` opened for O_DIRECT reads, or None where the system or file system refuses."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    if flags == os.O_RDONLY:
        return None
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None


def compact_files(directory: Path) -> list[Path]:
    """Return the compact files of a diff directory, in order (empty for other diffs)."""
    return sorted(path for path in directory.glob("*" + SUFFIX) if path.is_file())


def compact_tensor_table(
    directory: Path, indexes: list[tuple[Path, dict[str, CompactTensor]]] | None = None
) -> tuple[dict[str, TensorInfo], list[Path]]:
    """Return a compact diff's tensors as the tuned model has them (dtype, shape, file), and its files
    (``indexes``: each file's index, read already: a hub repository's, by ranged requests)."""
    if indexes is None:
        indexes = []
        for path in compact_files(directory):
            with ContainerReader(path) as reader:
                indexes.append((path, reader.tensors))
    tensors = {}
    for path, index in indexes:
        for name, entry in index.items():
            tensors[name] = TensorInfo(name, entry.dtype, entry.shape, path, offset=None)
    return tensors, [path for path, _ in indexes]
