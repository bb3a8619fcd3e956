"""Execute a plan block by block: read rows, do the float32 math, hash, write. Memory stays flat.

Each block of rows passes through a ring of reused buffers. The main thread reads (``pread``) and computes; one
thread per ordered stream hashes raw bytes, hashes results, and writes the shard, so on two cores hashing and
writeback overlap reading and arithmetic. A buffer set is reused only after every stream is done with it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arithmetic
from .checkpoint import Checkpoint
from .manifest import Digest, dtype_name, tensor_bytes
from .plan import Plan, ShardPlan, TensorJob
from .writer import ShardWriter

BLOCK_ELEMENTS = 8 * 2**20  # 32 MiB of float32 per block: large enough for fast I/O, small enough to stay flat
RING_DEPTH = 3


@dataclass(frozen=True)
class Hashing:
    """Which tensor hashes a run computes (each costs a pass of SHA-256 over those bytes)."""

    raw: bool = False
    diff: bool = False
    result: bool = False


@dataclass(frozen=True)
class TensorDigests:
    """The hashes computed for one tensor; None where the run did not compute them."""

    raw: Digest | None
    diff: Digest | None
    result: Digest | None


@dataclass
class _BufferSet:
    raw: torch.Tensor
    other: torch.Tensor
    work: torch.Tensor
    result: torch.Tensor
    cast: torch.Tensor
    pending: list[Future] = field(default_factory=list)

    @classmethod
    def allocate(cls, elements: int) -> _BufferSet:
        # torch.empty does not touch memory: only the bytes a block really uses become resident.
        return cls(
            raw=torch.empty(elements * 8, dtype=torch.uint8),
            other=torch.empty(elements * 8, dtype=torch.uint8),
            work=torch.empty(elements, dtype=torch.float32),
            result=torch.empty(elements, dtype=torch.float32),
            cast=torch.empty(elements * 8, dtype=torch.uint8),
        )

    def wait(self) -> None:
        """Block until every stream is done with these buffers, re-raising the first failure."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


class _Lane:
    """One ordered stream of work on its own thread (a hash or a file must see its blocks in order)."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"weight-diff-{name}")

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


@dataclass
class _TensorHashes:
    """Incremental SHA-256 of one tensor's raw, diff and result bytes, each fed on its own lane."""

    job: TensorJob
    raw: hashlib._Hash | None
    diff: hashlib._Hash | None
    result: hashlib._Hash | None
    futures: dict[str, Future] = field(default_factory=dict)

    def digests(self) -> TensorDigests:
        def digest(part: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Digest | None:
            future = self.futures.get(part)
            return Digest(dtype_name(dtype), list(shape), future.result()) if future else None

        return TensorDigests(
            raw=digest("raw", self.job.raw.dtype, self.job.raw.shape),
            diff=digest("diff", torch.float32, self.job.out_shape),
            result=digest("result", torch.float32, self.job.out_shape),
        )


class Pipeline:
    """Runs a plan's shards for one mode: ``recover`` writes raw + diff, ``make-diff`` writes tuned - raw."""

    def __init__(
        self,
        plan: Plan,
        raw: Checkpoint,
        other: Checkpoint,
        out_dir: Path,
        *,
        mode: str,
        hashing: Hashing,
        on_tensor: Callable[[TensorJob, TensorDigests], None],
        on_shard: Callable[[str, str], None],
        progress: Callable[[int], None] = lambda nbytes: None,
    ) -> None:
        if mode not in ("recover", "make-diff"):
            raise ValueError(mode)
        self.plan, self.raw, self.other, self.out_dir = plan, raw, other, out_dir
        self.mode, self.hashing = mode, hashing
        self.on_tensor, self.on_shard, self.progress = on_tensor, on_shard, progress
        largest_row = max((job.other.row_numel for job in plan.jobs), default=1)
        elements = max(BLOCK_ELEMENTS, largest_row)
        self._rows_budget = elements
        self._ring = [_BufferSet.allocate(elements) for _ in range(RING_DEPTH)]
        self._turn = 0
        self._lanes = {name: _Lane(name) for name in ("raw", "result", "write")}

    def run(self, skip: frozenset[str] = frozenset()) -> None:
        """Write every shard not in ``skip``; on any failure the unfinished shard is removed."""
        try:
            for shard in self.plan.shards:
                if shard.file_name in skip:
                    self.progress(shard.nbytes)
                    continue
                self._run_shard(shard)
        except BaseException:
            for buffers in self._ring:
                buffers.pending.clear()
            for lane in self._lanes.values():
                lane.close(cancel=True)
            raise
        for lane in self._lanes.values():
            lane.close()

    def _run_shard(self, shard: ShardPlan) -> None:
        writer = ShardWriter(self.out_dir, shard)
        try:
            unchecked: deque[_TensorHashes] = deque()
            for job in shard.jobs:
                unchecked.append(self._run_tensor(job, writer))
                # Check earlier tensors whose hashes are ready, without stalling on the one just queued.
                while unchecked and all(f.done() for f in unchecked[0].futures.values()):
                    hashes = unchecked.popleft()
                    self.on_tensor(hashes.job, hashes.digests())
            for buffers in self._ring:
                buffers.wait()
            while unchecked:
                hashes = unchecked.popleft()
                self.on_tensor(hashes.job, hashes.digests())
            digest = self._lanes["write"].submit(writer.finish).result()
        except BaseException:
            for buffers in self._ring:
                with contextlib.suppress(BaseException):  # the first failure is already on its way up
                    buffers.wait()
            writer.abort()
            raise
        self.on_shard(shard.file_name, digest)

    def _next_buffers(self) -> _BufferSet:
        buffers = self._ring[self._turn % RING_DEPTH]
        self._turn += 1
        buffers.wait()
        return buffers

    def _run_tensor(self, job: TensorJob, writer: ShardWriter) -> _TensorHashes:
        hashes = _TensorHashes(
            job,
            raw=hashlib.sha256() if self.hashing.raw else None,
            diff=hashlib.sha256() if self.hashing.diff else None,
            result=hashlib.sha256() if self.hashing.result else None,
        )
        mean = arithmetic.RowMean(job.raw.shape[1:]) if job.added_rows else None
        rows_per_block = max(1, self._rows_budget // job.other.row_numel)
        # Raw rows first, then the added vocabulary rows, so that no block mixes the two.
        for low, high in ((0, job.raw.rows), (job.raw.rows, job.other.rows)):
            for start in range(low, high, rows_per_block):
                stop = min(start + rows_per_block, high)
                self._run_block(job, start, stop, writer, hashes, mean)
        for part in ("raw", "diff", "result"):
            hasher = getattr(hashes, part)
            if hasher is not None:
                lane = "result" if part == "diff" else part
                hashes.futures[part] = self._lanes[lane].submit(hasher.hexdigest)
        return hashes

    def _run_block(
        self,
        job: TensorJob,
        start: int,
        stop: int,
        writer: ShardWriter,
        hashes: _TensorHashes,
        mean: arithmetic.RowMean | None,
    ) -> None:
        buffers = self._next_buffers()
        count = (stop - start) * job.other.row_numel
        shape = (stop - start, *job.other.shape[1:]) if job.other.shape else ()
        work = buffers.work[:count].view(shape)
        result = buffers.result[:count].view(shape)
        other = self.other.read_rows(job.other, start, stop, out=buffers.other)
        raw_rows = job.raw.rows
        if stop <= raw_rows:
            raw = self.raw.read_rows(job.raw, start, stop, out=buffers.raw)
            if hashes.raw is not None:
                buffers.pending.append(self._lanes["raw"].submit(hashes.raw.update, tensor_bytes(raw)))
            if mean is not None:
                mean.add(raw)
            base = raw
        elif start >= raw_rows:
            base = mean.value().view((1, *shape[1:])).expand(shape)
        else:
            raise AssertionError("a block mixes raw and added rows")
        if self.mode == "recover":
            written = arithmetic.recover_rows(base, other, result)
            if hashes.result is not None:
                buffers.pending.append(self._lanes["result"].submit(hashes.result.update, tensor_bytes(result)))
        else:
            arithmetic.diff_rows(base, other, work, result)
            written = work
            if hashes.diff is not None or hashes.result is not None:
                buffers.pending.append(self._lanes["result"].submit(_update_both, hashes, work, result))
        if job.out_dtype != torch.float32:
            cast = buffers.cast[: count * job.out_dtype.itemsize].view(job.out_dtype).view(shape)
            cast.copy_(written)
            written = cast
        buffers.pending.append(self._lanes["write"].submit(writer.write, tensor_bytes(written)))
        buffers.pending.append(self._lanes["write"].submit(self.progress, written.numel() * written.element_size()))


def _update_both(hashes: _TensorHashes, diff: torch.Tensor, result: torch.Tensor) -> None:
    if hashes.diff is not None:
        hashes.diff.update(tensor_bytes(diff))
    if hashes.result is not None:
        hashes.result.update(tensor_bytes(result))
