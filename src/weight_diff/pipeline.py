"""Execute a plan block by block: read rows, do the float32 math, hash, write. Memory stays flat.

Each block of rows passes through a ring of reused buffer sets. Work is split into ordered lanes, one thread each,
so that on two cores the disk never waits for Python:

- ``read``: ``pread`` of the next block's raw and diff rows, one block ahead of the arithmetic;
- main thread: the float32 arithmetic (and the mean of raw rows for added vocabulary rows);
- ``raw`` / ``result``: SHA-256 of raw bytes and of float32 results, for the manifest; ``raw`` also feeds the
  plausibility statistics (``checks.py``);
- ``write`` and ``file``: the shard's bytes to disk, and their SHA-256 for ``SHA256SUMS``;
- ``sync``: a finished shard's fdatasync and rename, while the next shard is already being written.

A buffer set is reused only after every lane is done with it; any lane's failure stops the run.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arithmetic
from .checkpoint import DIRECT_ALIGN, Checkpoint, aligned_bytes, rows_shape
from .errors import UsageError
from .manifest import Digest, dtype_name, tensor_bytes
from .plan import Plan, ShardPlan, TensorJob
from .writer import ShardWriter

BLOCK_ELEMENTS = 8 * 2**20  # 32 MiB of float32 per block: large enough for fast I/O, small enough to stay flat
BAND_ELEMENTS = 4 * BLOCK_ELEMENTS  # column band for torch's float32 row mean (Alpaca-style added rows)
RING_DEPTH = 4
LANES = ("read", "raw", "result", "write", "file", "sync")


@dataclass(frozen=True)
class Hashing:
    """Which tensor hashes a run computes (each costs a pass of SHA-256 over those bytes)."""

    raw: bool = False
    diff: bool = False
    result: bool = False
    sums: bool = False  # each result tensor's sum, for a family's integrity sum


@dataclass(frozen=True)
class TensorDigests:
    """The hashes computed for one tensor (None where the run did not compute them), and what its written values
    were like: any NaN or Inf, or all zero (a diff of a model against itself)."""

    raw: Digest | None
    diff: Digest | None
    result: Digest | None
    sum: float | None = None  # of the result (float64 over blocks), for a family's integrity sum
    nonfinite: bool = False
    all_zero: bool = False


@dataclass(frozen=True)
class _Block:
    """Rows ``start:stop`` of one job; ``added`` blocks lie past raw's rows (new vocabulary)."""

    job: TensorJob
    start: int
    stop: int
    added: bool
    last: bool  # the tensor's final block

    @property
    def shape(self) -> tuple[int, ...]:
        return rows_shape(self.job.other.shape, self.start, self.stop)

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.job.other.row_numel


def _blocks(shard: ShardPlan, budget: int) -> Iterator[_Block]:
    """Yield each job's blocks in order: raw rows first, then added vocabulary rows, never mixed in one block."""
    for job in shard.jobs:
        rows_per_block = max(1, budget // job.other.row_numel)
        spans = []
        for low, high, added in ((0, job.raw_rows, False), (job.raw_rows, job.other.rows, True)):
            spans += [(start, min(start + rows_per_block, high), added) for start in range(low, high, rows_per_block)]
        for index, (start, stop, added) in enumerate(spans):
            yield _Block(job, start, stop, added, last=index == len(spans) - 1)


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
        # Neither torch.empty nor mmap touches memory: only the bytes a block really uses become resident.
        # Read buffers are page-aligned, with a page of slack each side, for O_DIRECT reads.
        return cls(
            raw=aligned_bytes(elements * 8 + 2 * DIRECT_ALIGN),
            other=aligned_bytes(elements * 8 + 2 * DIRECT_ALIGN),
            # Written blocks start on a page: O_DIRECT writes them without a copy (writer.py).
            work=aligned_bytes(elements * 4).view(torch.float32),
            result=aligned_bytes(elements * 4).view(torch.float32),
            cast=aligned_bytes(elements * 8),
        )

    def wait(self) -> None:
        """Block until every lane is done with these buffers, re-raising the first failure."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


@dataclass
class _TensorHashes:
    """Incremental SHA-256 of one tensor's raw, diff and result bytes, each fed on its own lane, and the running
    mean of its raw rows when the tensor adds vocabulary rows."""

    job: TensorJob
    raw: hashlib._Hash | None
    diff: hashlib._Hash | None
    result: hashlib._Hash | None
    mean: arithmetic.RowMean | None
    fixed_mean: torch.Tensor | None = None  # torch's float32 mean of raw's rows, computed before the tensor
    total: float | None = None  # the result's running sum (float64), when the run sums
    futures: dict[str, Future] = field(default_factory=dict)
    nonfinite: bool = False  # set on the result lane, block by block
    nonzero: bool = False

    def ready(self) -> bool:
        return all(future.done() for future in self.futures.values())

    def digests(self) -> TensorDigests:
        def digest(part: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Digest | None:
            future = self.futures.get(part)
            return Digest(dtype_name(dtype), list(shape), future.result()) if future else None

        raw = self.job.raw
        return TensorDigests(
            raw=digest("raw", raw.dtype, raw.shape) if raw is not None else None,
            diff=digest("diff", torch.float32, self.job.out_shape),
            result=digest("result", torch.float32, self.job.out_shape),
            sum=self.total,
            nonfinite=self.nonfinite,
            all_zero=not self.nonzero,
        )


@dataclass
class _Finishing:
    """A shard whose bytes are all queued: its fdatasync/rename and its file hash are still in flight."""

    name: str
    writer: ShardWriter
    done: Future
    digest: Future


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
        observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
        before_finish: Callable[[list[str]], None] | None = None,
    ) -> None:
        if mode not in ("recover", "make-diff"):
            raise ValueError(mode)
        self.plan, self.raw, self.other, self.out_dir = plan, raw, other, out_dir
        self.mode, self.hashing = mode, hashing
        self.on_tensor, self.on_shard, self.progress = on_tensor, on_shard, progress
        self.observe = observe  # sees every block of raw rows with the other side's (plausibility statistics)
        # Waits until the inputs of a shard's tensors are checked (a diff read while it downloads), or raises: the
        # shard is renamed into place, and journaled, only after.
        self.before_finish = before_finish
        largest_row = max((job.other.row_numel for job in plan.jobs), default=1)
        self._budget = max(BLOCK_ELEMENTS, largest_row)
        self._ring = [_BufferSet.allocate(self._budget) for _ in range(RING_DEPTH)]
        self._lanes = {name: ThreadPoolExecutor(1, thread_name_prefix=f"weight-diff-{name}") for name in LANES}
        self._finishing: _Finishing | None = None
        self._writer: ShardWriter | None = None
        self._mean_read: torch.Tensor | None = None

    def run(self, skip: frozenset[str] = frozenset()) -> None:
        """Write every shard not in ``skip``; on any failure unfinished shards are removed."""
        try:
            for shard in self.plan.shards:
                if shard.file_name in skip:
                    self.progress(shard.nbytes)
                    continue
                self._run_shard(shard)
            self._settle_finishing()
        except BaseException:
            self._abandon()
            raise
        finally:
            for lane in self._lanes.values():
                lane.shutdown(wait=True, cancel_futures=True)

    def _submit(self, lane: str, fn: Callable, *args) -> Future:
        return self._lanes[lane].submit(fn, *args)

    def _run_shard(self, shard: ShardPlan) -> None:
        writer = ShardWriter(self.out_dir, shard)
        self._writer = writer
        file_hash = hashlib.sha256()
        self._submit("file", file_hash.update, writer.header)
        unchecked: deque[_TensorHashes] = deque()
        blocks = list(_blocks(shard, self._budget))
        reads: deque[Future] = deque()
        hashes: _TensorHashes | None = None
        for index, block in enumerate(blocks):
            # Keep one block's reads in flight ahead of the arithmetic.
            while len(reads) < 2 and index + len(reads) < len(blocks):
                ahead = index + len(reads)
                reads.append(self._queue_read(blocks[ahead], self._ring[ahead % RING_DEPTH]))
            raw, other = reads.popleft().result()
            if hashes is None:
                hashes = self._new_hashes(block.job)
            self._compute(block, self._ring[index % RING_DEPTH], raw, other, writer, file_hash, hashes)
            if block.last:
                self._close_hashes(hashes)
                unchecked.append(hashes)
                hashes = None
                while unchecked and unchecked[0].ready():  # check finished tensors without stalling
                    done = unchecked.popleft()
                    self.on_tensor(done.job, done.digests())
        for buffers in self._ring:
            buffers.wait()
        while unchecked:
            done = unchecked.popleft()
            self.on_tensor(done.job, done.digests())
        # Every tensor of this shard checked: flush and rename it while the next shard is being written.
        self._settle_finishing()
        self._finishing = _Finishing(
            shard.file_name,
            writer,
            done=self._submit("sync", self._finish, shard, writer),
            digest=self._submit("file", file_hash.hexdigest),
        )

    def _finish(self, shard: ShardPlan, writer: ShardWriter) -> None:
        if self.before_finish is not None:
            self.before_finish([job.name for job in shard.jobs])
        writer.finish()

    def _settle_finishing(self) -> None:
        """Wait for the previous shard to be on disk under its name, then report it to ``on_shard``."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            finishing.done.result()
            self.on_shard(finishing.name, finishing.digest.result())

    def _abandon(self) -> None:
        """After a failure: let lanes drain, keep a shard that did finish, remove anything unfinished."""
        self.raw.interrupt()  # a reader waiting for a download gives up at once
        self.other.interrupt()
        for buffers in self._ring:
            with contextlib.suppress(BaseException):  # the first failure is already on its way up
                buffers.wait()
        finishing = self._finishing
        if finishing is not None:
            try:
                self._settle_finishing()
            except BaseException:
                finishing.writer.abort()
        if self._writer is not None and not self._writer.path.exists():
            self._writer.abort()

    def _queue_read(self, block: _Block, buffers: _BufferSet) -> Future:
        buffers.wait()  # its previous block is hashed and written
        future = self._submit("read", self._read, block, buffers)
        buffers.pending.append(future)
        return future

    def _read(self, block: _Block, buffers: _BufferSet) -> tuple[torch.Tensor | None, torch.Tensor]:
        other = self.other.read_rows(block.job.other, block.start, block.stop, out=buffers.other)
        if block.added:
            return None, other
        return self.raw.read_rows(block.job.raw, block.start, block.stop, out=buffers.raw), other

    def _new_hashes(self, job: TensorJob) -> _TensorHashes:
        hashes = _TensorHashes(
            job,
            raw=hashlib.sha256() if self.hashing.raw else None,
            diff=hashlib.sha256() if self.hashing.diff else None,
            result=hashlib.sha256() if self.hashing.result else None,
            mean=arithmetic.RowMean(job.raw.shape[1:]) if job.added_rows and job.fill == "mean" else None,
            total=0.0 if self.hashing.sums else None,
        )
        if job.added_rows and job.fill == "torch-mean":
            hashes.fixed_mean = arithmetic.torch_row_mean(
                lambda start, stop: self.raw.read_rows(job.raw, start, stop, out=self._mean_buffer()),
                rows=job.raw.rows,
                width=job.raw.row_numel,
                budget=BAND_ELEMENTS,
                rows_per_read=max(1, self._budget // job.raw.row_numel),
            )
        return hashes

    def _mean_buffer(self) -> torch.Tensor:
        if self._mean_read is None:
            self._mean_read = aligned_bytes(self._budget * 8 + 2 * DIRECT_ALIGN)
        return self._mean_read

    def _close_hashes(self, hashes: _TensorHashes) -> None:
        for part, lane in (("raw", "raw"), ("diff", "result"), ("result", "result")):
            hasher = getattr(hashes, part)
            if hasher is not None:
                hashes.futures[part] = self._submit(lane, hasher.hexdigest)
        hashes.futures["values"] = self._submit("result", lambda: None)  # the lane is ordered: every block looked at

    def _compute(
        self,
        block: _Block,
        buffers: _BufferSet,
        raw: torch.Tensor | None,
        other: torch.Tensor,
        writer: ShardWriter,
        file_hash: hashlib._Hash,
        hashes: _TensorHashes,
    ) -> None:
        shape, count, job = block.shape, block.numel, block.job
        work = buffers.work[:count].view(shape)
        result = buffers.result[:count].view(shape)
        if raw is not None:
            if hashes.raw is not None:
                buffers.pending.append(self._submit("raw", hashes.raw.update, tensor_bytes(raw)))
            if hashes.mean is not None:
                hashes.mean.add(raw)
            if self.observe is not None:  # on the raw lane: off the arithmetic's critical path
                buffers.pending.append(self._submit("raw", self.observe, job.name, raw, other))
            base = raw
        elif job.absolute or job.fill == "stored":
            base = None
        elif job.fill == "zero":
            base = torch.zeros((), dtype=job.arithmetic).expand(shape)
        else:
            mean = hashes.fixed_mean if hashes.fixed_mean is not None else hashes.mean.value()
            base = mean.view((1, *shape[1:])).expand(shape)
        if self.mode == "recover":
            if job.arithmetic != torch.float32:  # float16 families: both sides cast, then added, in float16
                result = _as(buffers.result, job.arithmetic, count, shape)
                work = _as(buffers.work, job.arithmetic, count, shape)
            written = arithmetic.recover_rows(base, other, result, work)
            if hashes.result is not None:
                buffers.pending.append(self._submit("result", hashes.result.update, tensor_bytes(result)))
            if hashes.total is not None:
                hashes.total += written.sum(dtype=torch.float64).item()
        else:
            if job.arithmetic != torch.float32:  # a float16 family's delta: both cast, subtracted in float16
                result = _as(buffers.result, job.arithmetic, count, shape)
                work = _as(buffers.work, job.arithmetic, count, shape)
            arithmetic.diff_rows(base, other, work, result)
            written = work
            if hashes.diff is not None or hashes.result is not None:
                buffers.pending.append(self._submit("result", _update_both, hashes, work, result))
        values, cast = written, None
        if job.out_dtype != written.dtype:
            cast = buffers.cast[: count * job.out_dtype.itemsize].view(job.out_dtype).view(shape)
            cast.copy_(written)
            written = cast
        buffers.pending.append(self._submit("result", _look_at_values, hashes, values, cast))
        data = tensor_bytes(written)
        buffers.pending.append(self._submit("file", file_hash.update, data))
        buffers.pending.append(self._submit("write", writer.write, data))
        buffers.pending.append(self._submit("write", self.progress, len(data)))


def _as(buffer: torch.Tensor, dtype: torch.dtype, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the first ``count`` elements of a reused float32 buffer, viewed as ``dtype`` in ``shape``."""
    return buffer.view(torch.uint8)[: count * dtype.itemsize].view(dtype).view(shape)


def _look_at_values(hashes: _TensorHashes, values: torch.Tensor, cast: torch.Tensor | None) -> None:
    """Note NaN/Inf and non-zero values of a block, and refuse a cast that turns finite values into Inf.

    On the result lane, beside the hashing.
    """
    finite = arithmetic.finite_range(values)
    if finite is None:
        hashes.nonfinite = hashes.nonzero = True
        return
    low, high = finite
    hashes.nonzero = hashes.nonzero or low != 0 or high != 0
    if cast is not None and arithmetic.finite_range(cast) is None:
        name = dtype_name(cast.dtype)
        raise UsageError(
            f"tensor {hashes.job.name}: values up to {max(abs(low), abs(high)):.3g} exceed {name}'s range and would "
            f"be written as Inf; run again with --dtype bfloat16 or float32 and --overwrite"
        )


def _update_both(hashes: _TensorHashes, diff: torch.Tensor, result: torch.Tensor) -> None:
    if hashes.diff is not None:
        hashes.diff.update(tensor_bytes(diff))
    if hashes.result is not None:
        hashes.result.update(tensor_bytes(result))
