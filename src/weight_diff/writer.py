"""Stream tensors into one safetensors shard without ever holding the shard in memory.

The safetensors library has no incremental writer, so this one writes the header itself (every shape and dtype
is known from the plan), then the tensor bytes in plan order. The shard lives under a ``.partial`` name until it
is complete and on disk (fdatasync), then is renamed into place: a shard with its final name is always whole.

>>> writer = ShardWriter(out_dir, shard)      # writes writer.header
>>> writer.write(block_bytes)                # ... every block of every tensor, in plan order
>>> writer.finish()                          # on disk, under its final name
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .checkpoint import SAFETENSORS_NAMES
from .errors import DiskFullError
from .plan import ShardPlan

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o644
SYNC_EVERY = 1 * 2**30  # bound dirty pages so the final fdatasync is short and writeback overlaps compute


def safetensors_header(shard: ShardPlan) -> bytes:
    """Return the shard's header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in shard.jobs:
        entries[job.name] = {
            "dtype": SAFETENSORS_NAMES[job.out_dtype],
            "shape": list(job.out_shape),
            "data_offsets": [offset, offset + job.out_nbytes],
        }
        offset += job.out_nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class ShardWriter:
    """Writes one shard under a temporary name and renames it when complete (the caller hashes the bytes)."""

    def __init__(self, directory: Path, shard: ShardPlan) -> None:
        self.path = directory / shard.file_name
        self.partial = directory / (shard.file_name + PARTIAL_SUFFIX)
        self.header = safetensors_header(shard)
        self.expected = len(self.header) + shard.nbytes
        self.written = 0
        self._unsynced = 0
        self._failure: Exception | None = None
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(self._fd, FILE_MODE)
            self.write(self.header)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the shard; ENOSPC becomes a DiskFullError after the partial file is removed.

        Once a write has failed, every later one raises that same error: blocks still queued behind it must not
        hide the cause behind a closed file descriptor.
        """
        if self._failure is not None:
            raise self._failure
        view = memoryview(data).cast("B")
        try:
            while view:
                done = os.write(self._fd, view)
                view = view[done:]
                self.written += done
                self._unsynced += done
            if self._unsynced >= SYNC_EVERY:
                os.fdatasync(self._fd)
                self._unsynced = 0
        except OSError as exc:
            raise self._fail(exc) from None

    def finish(self) -> None:
        """Flush the complete shard to disk and give it its final name."""
        if self._failure is not None:
            raise self._failure
        if self.written != self.expected:
            self.abort()
            raise RuntimeError(f"{self.path.name}: wrote {self.written} bytes, planned {self.expected}")
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise self._fail(exc) from None
        os.close(self._fd)
        self._fd = -1
        os.replace(self.partial, self.path)

    def _fail(self, exc: OSError) -> Exception:
        self.abort()
        if exc.errno == errno.ENOSPC:
            self._failure = DiskFullError(
                f"{self.path.parent}: disk full while writing {self.path.name}; the unfinished shard was removed. "
                "Free space and run again with --resume"
            )
        else:
            self._failure = exc
        return self._failure

    def abort(self) -> None:
        """Close and remove the unfinished file; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.partial.unlink(missing_ok=True)
