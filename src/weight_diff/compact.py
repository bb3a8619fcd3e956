"""Compact diffs, end to end: pair tuned tensors with raw ones, then stream blocks through the codec, both ways.

``make-diff --format compact`` writes, for each tensor, the tuned bits XOR the raw bits cast to the tuned dtype
(codec.py), into ``.wdc`` files (container.py); ``recover`` undoes it and gets the tuned model back bit for bit,
in its own dtype. Rows with no raw counterpart (added vocabulary rows, tensors the raw model lacks) are stored as
they are. Blocks are encoded on a pool of threads (zstd and torch release the GIL) and consumed in order on the
calling thread; recover decompresses and casts on the read lanes and joins on one codec thread. Each tensor is
hashed on a lane of its own, and files are hashed and written on lanes of their own. A ring of reused buffers
keeps memory flat.

>>> plan = plan_make(raw.tensors, tuned.tensors, max_shard_size="5GB")
>>> CompactStream(plan, raw, out_dir, progress=bar.update).encode(tuned, skip=frozenset(), on_tensor=..., on_shard=...)
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .arithmetic import finite_range
from .checkpoint import (
    DIRECT_ALIGN,
    FLOAT_DTYPES,
    Checkpoint,
    TensorInfo,
    aligned_bytes,
    rows_shape,
    shape_row_numel,
    shape_rows,
)
from .codec import (
    DENSE_PARAMETERS,
    SPARSE_PARAMETERS,
    BlockDecoder,
    BlockEncoder,
    BlockError,
    Scratch,
    cast_to,
    payload_capacity,
    unpacked_capacity,
)
from .container import MAX_ROW_VALUES, SUFFIX, CompactTensor, ContainerReader, ContainerWriter, compact_files
from .errors import IntegrityError, PlanError, UsageError
from .manifest import Digest, Manifest, TensorRecord, dtype_name, tensor_bytes
from .plan import Plan, ShardPlan, plan_pairs, plan_shards
from .sizes import parse_size
from .writer import ShardWriter

BLOCK_ELEMENTS = 2 * 2**20  # measured: 1M to 16M values per block compress alike; 2M runs 5-10% faster than 4M (cache)
# Codec threads, on the two-core machines this is made for. Encoding is the heavy part of make-diff: two threads.
# Recover has one, which only joins (2.6 s of CPU for a float32 tune at 13B width, 2 layers), its zstd and casts done
# on the read lanes and its hashes on lanes of their own.
ENCODE_WORKERS = 2
RING_DEPTH = 10  # blocks in flight: read ahead, two in the codec, one being hashed, writes queued
CODEC = {
    "transform": "xor: tuned bits XOR bits of raw cast to the tuned dtype (round to nearest even); 0 where no raw",
    "bytes": "split by significance per block: for each value whose highest byte is not zero, its step from the "
    "previous one (steps over 255 in entries of 255 with a zero byte), then those highest bytes, every value's "
    "second-highest byte, then the remaining low bytes of every value as stored",
    "compressor": "zstd",
    "frames": "two per block: the steps and highest bytes, then the rest",
    "parameters": [SPARSE_PARAMETERS, DENSE_PARAMETERS],
    "checksum": "zstd content checksum (XXH64 of the frame's decoded bytes) in every frame",
}


@dataclass(frozen=True)
class CompactJob:
    """One tuned tensor: its dtype and shape, the raw tensor its first ``raw_rows`` rows are coded against (None:
    no counterpart), and ``other``, where its values come from (a tuned tensor to encode or a compact entry to
    decode), named as a float32 plan's ``TensorJob`` names it."""

    name: str
    out_dtype: torch.dtype
    out_shape: tuple[int, ...]
    raw: TensorInfo | None
    other: TensorInfo | CompactTensor

    @property
    def out_nbytes(self) -> int:
        return self.rows * self.row_numel * self.out_dtype.itemsize

    @property
    def rows(self) -> int:
        return shape_rows(self.out_shape)

    @property
    def row_numel(self) -> int:
        return shape_row_numel(self.out_shape)

    @property
    def raw_rows(self) -> int:
        return self.raw.rows if self.raw is not None else 0


def plan_make(raw: dict[str, TensorInfo], tuned: dict[str, TensorInfo], *, max_shard_size: str | int) -> Plan:
    """Return the plan of a compact diff: tuned tensors in order, grouped into ``.wdc`` files by tuned bytes.

    Tensors the raw model also has are checked as for a float32 diff (shapes, added vocabulary rows, raw tensors
    the tuned model lacks); tensors it lacks are stored as they are.
    """
    matched = {name: info for name, info in tuned.items() if name in raw}
    paired = {job.name: job for job in plan_pairs(raw, matched, other_role="tuned model", out_dtype="auto",
                                                  max_shard_size=max_shard_size).jobs}  # fmt: skip
    jobs = []
    for name, info in tuned.items():
        if info.dtype not in FLOAT_DTYPES:
            raise PlanError(f"tuned tensor {name} is {info.dtype}, not floating point: not model weights")
        if info.row_numel > MAX_ROW_VALUES:  # recover refuses such rows: they are a unit of memory on every lane
            raise PlanError(f"tuned tensor {name} has rows of {info.row_numel} values; the compact format takes "
                            f"rows of up to {MAX_ROW_VALUES}: use --format float32")  # fmt: skip
        base = paired[name].raw if name in paired else None
        jobs.append(CompactJob(name, info.dtype, info.shape, base, info))
    return _plan(jobs, max_shard_size, file_name=_compact_name)


def _compact_name(model_shard: str) -> str:
    """Return ``diff-00001-of-00003.wdc`` for ``model-00001-of-00003.safetensors`` (``diff.wdc`` when one)."""
    return model_shard.replace("model", "diff").removesuffix(".safetensors") + SUFFIX


def plan_recover(
    raw: dict[str, TensorInfo],
    indexes: list[tuple[Path, dict[str, CompactTensor]]],
    *,
    dtype: str,
    max_shard_size: str | int,
    manifest: Manifest | None,
) -> Plan:
    """Return the plan of recovering a compact diff: every tensor in its own dtype, paired with raw where coded
    against it; refuses, before any write, a raw tensor that is missing or of another dtype or shape. Each file's
    index is first held against the manifest, so that a damaged or foreign file is blamed, not the raw model."""
    if dtype != "auto":
        raise UsageError(
            f"--dtype {dtype}: a compact diff recovers the tuned model bit for bit in its own dtype; omit --dtype"
        )
    jobs = []
    seen: dict[str, Path] = {}
    for path, tensors in indexes:
        for entry in tensors.values():
            if entry.name in seen:
                raise PlanError(
                    f"{path.parent}: tensor {entry.name} is in both {seen[entry.name].name} and {path.name}: the "
                    "folder holds a second copy of a file (a repeated download?) or files of two diffs; keep only the "
                    "files the diff's SHA256SUMS lists"
                )
            seen[entry.name] = path
            if manifest is not None:
                _check_entry(entry, manifest)
            base = None
            if entry.raw_dtype is not None:
                base = raw.get(entry.name)
                expected = entry.raw_shape
                if base is None:
                    raise PlanError(f"the diff codes {entry.name} against the raw model, which lacks it: give the "
                                    "raw model the diff was made from")  # fmt: skip
                if base.dtype != entry.raw_dtype or base.shape != expected:
                    raise IntegrityError(
                        f"raw tensor {entry.name} is {dtype_name(base.dtype)} {list(base.shape)}; the diff was made "
                        f"against {dtype_name(entry.raw_dtype)} {list(expected)}. Your raw model was converted "
                        "differently (precision or size) from the publisher's base"
                    )
            jobs.append(CompactJob(entry.name, entry.dtype, entry.shape, base, entry))
    return _plan(jobs, max_shard_size, file_name=lambda name: name)


def _check_entry(entry: CompactTensor, manifest: Manifest) -> None:
    """Refuse a file whose index says other than the manifest of a tensor: its name, its dtype and shape, and the
    raw tensor it was coded against."""
    record = manifest.tensors.get(entry.name)
    if record is None:
        raise IntegrityError(
            f"{entry.file}: holds tensor {entry.name}, which the diff's manifest does not list: a file of another "
            "diff, or damaged; download it again"
        )
    raw = entry.raw_dtype and (dtype_name(entry.raw_dtype), list(entry.raw_shape))
    coded = (dtype_name(entry.dtype), list(entry.shape), raw)
    if coded != (record.result.dtype, record.result.shape, record.raw and (record.raw.dtype, record.raw.shape)):
        raise IntegrityError(
            f"{entry.file}: its index and the diff's manifest disagree about tensor {entry.name} (its dtype, shape "
            "or raw counterpart): a file of another diff, or damaged; download it again"
        )


def _plan(jobs: list[CompactJob], max_shard_size: str | int, file_name: Callable[[str], str]) -> Plan:
    shards = plan_shards(jobs, parse_size(max_shard_size))  # grouped by out_nbytes, as model shards are
    return Plan(tuple(ShardPlan(file_name(shard.file_name), shard.jobs) for shard in shards))


def is_compact(directory: Path) -> bool:
    """Return whether a diff directory holds a compact diff."""
    return bool(compact_files(directory))


class Files(Protocol):
    """Where the ``.wdc`` files come from while they are read (``sources/compact_files.py``)."""

    def read_in(self, order: list[Path]) -> None: ...

    def open(self, path: Path) -> ContainerReader: ...

    def done_with(self, path: Path) -> None: ...

    def interrupt(self) -> None: ...


@dataclass(frozen=True)
class _Block:
    job: CompactJob
    index: int  # within the tensor
    start: int
    stop: int
    against_raw: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return rows_shape(self.job.out_shape, self.start, self.stop)

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.job.row_numel


def _blocks(shard: ShardPlan) -> Iterator[_Block]:
    """Yield the blocks of make-diff: raw-coded rows first, then rows stored as they are, never mixed."""
    for job in shard.jobs:
        step = max(1, BLOCK_ELEMENTS // job.row_numel)
        index = 0
        for low, high, against_raw in ((0, job.raw_rows, True), (job.raw_rows, job.rows, False)):
            for start in range(low, high, step):
                yield _Block(job, index, start, min(start + step, high), against_raw)
                index += 1


def _stored_blocks(shard: ShardPlan) -> Iterator[_Block]:
    """Yield the blocks of recover, as the compact file lists them."""
    for job in shard.jobs:
        for index, block in enumerate(job.other.blocks):
            yield _Block(job, index, block.start, block.stop, block.stop <= job.other.raw_rows)


@dataclass
class _Buffers:
    """One ring slot: read buffers for a block, and the lane work that still uses them."""

    raw: torch.Tensor
    other: torch.Tensor
    payload: torch.Tensor  # the compressed block: encoded into (make-diff), read into (recover)
    sections: torch.Tensor  # recover: the payload decompressed
    cast: torch.Tensor  # recover: the raw rows cast to the tuned dtype
    pending: list[Future] = field(default_factory=list)

    @classmethod
    def allocate(cls, elements: int) -> _Buffers:
        """Allocate for blocks of up to ``elements`` values of up to 8 bytes (memory is taken only where used)."""
        nbytes = elements * 8 + 2 * DIRECT_ALIGN  # page-aligned with slack each side, for O_DIRECT reads
        payload = aligned_bytes(payload_capacity(elements, 8) + 2 * DIRECT_ALIGN)
        sections = aligned_bytes(unpacked_capacity(elements, 8))
        return cls(aligned_bytes(nbytes), aligned_bytes(nbytes), payload, sections, aligned_bytes(elements * 8))

    def wait(self) -> None:
        """Block until no lane uses these buffers, re-raising the first failure."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


def _nonfinite(values: torch.Tensor) -> bool:
    """Whether a block of tuned values holds NaN or Inf, found as the float32 path finds it (on a codec lane).

    A sum in the values' dtype is finite when every value is (2x faster than ``aminmax`` on bfloat16); only a sum
    that overflowed, or a block that really holds NaN or Inf, takes the exact look.
    """
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return False
    return finite_range(values) is None


def _record(job: CompactJob, result: hashlib._Hash) -> TensorRecord:
    """Return a tensor's manifest record: the tuned tensor's hash in its own dtype, and the raw's dtype and shape.

    The raw is not hashed: every block carries its checksum, so when the blocks are intact and the result is not
    the publisher's, the raw is what differs; skipping it saves a pass of SHA-256 both ways.
    """
    raw = Digest(dtype_name(job.raw.dtype), list(job.raw.shape), None) if job.raw is not None else None
    return TensorRecord(raw=raw, diff=None, result=Digest(dtype_name(job.out_dtype), list(job.out_shape),
                                                           result.hexdigest()))  # fmt: skip


@contextlib.contextmanager
def _damage(block: _Block) -> Iterator[None]:
    """Turn a block's BlockError into an IntegrityError naming the file, tensor, rows and bytes."""
    try:
        yield
    except BlockError as exc:
        entry = block.job.other
        stored = entry.blocks[block.index]
        raise IntegrityError(
            f"{entry.file}: block {block.index} of tensor {entry.name} (rows {block.start}:{block.stop}, "
            f"{stored.size} bytes at offset {stored.offset}) is damaged ({exc}); download "
            f"{entry.file.name} again. No model was written"
        ) from None


class _TensorHashes:
    """Each tensor's SHA-256 (for the manifest), taken on a lane of its own in block order; a finished tensor goes
    to ``on_tensor`` once its hash is in, without stalling the loop that feeds the lanes. Hashing on the calling
    thread held that loop up: make-diff of a float32 tune took 7.4-7.8 s that way, 6.8-7.0 s with the lane."""

    def __init__(self, lane: ThreadPoolExecutor, on_tensor: Callable) -> None:
        self._lane, self._on_tensor = lane, on_tensor
        self._result, self._nonfinite = hashlib.sha256(), False
        self._waiting: deque[tuple[CompactJob, Future, bool]] = deque()

    def add(self, block: _Block, data: memoryview, nonfinite: bool) -> Future:
        """Queue a block's tuned bytes; return the future that uses them (their buffer is busy until it is done)."""
        if block.index == 0:
            self._result, self._nonfinite = hashlib.sha256(), False
        self._nonfinite = self._nonfinite or nonfinite
        update = self._lane.submit(self._result.update, data)
        if block.stop == block.job.rows:
            self._waiting.append((block.job, self._lane.submit(_record, block.job, self._result), self._nonfinite))
        self.report(wait=False)
        return update

    def report(self, *, wait: bool) -> None:
        """Hand finished tensors to ``on_tensor``, in order: those hashed already, or (``wait``) every one."""
        while self._waiting and (wait or self._waiting[0][1].done()):
            job, record, nonfinite = self._waiting.popleft()
            self._on_tensor(job, record.result(), nonfinite)


class CompactStream:
    """Runs a compact plan's files: ``encode`` (make-diff) writes ``.wdc`` files, ``decode`` (recover) writes
    safetensors shards. Either calls ``on_tensor(job, record, nonfinite)`` after each tensor (``nonfinite``: its
    values hold NaN or Inf) and ``on_shard(name, sha256)`` once a file is on disk under its name.

    Lanes: two threads read blocks ahead, one the raw rows and one the tuned rows or the payload (two reads in
    flight: make-diff of a bfloat16 tune 3.6-3.8 s against 4.1-4.2 s with one lane for both), codec threads
    encode or decode them, one thread hashes the tuned values in order, one writes, and one more hashes the
    written file (apart from the writes, which wait on the disk).
    """

    def __init__(self, plan: Plan, raw: Checkpoint, out_dir: Path, *, progress: Callable[[int], None]) -> None:
        self.plan, self.raw, self.out_dir, self.progress = plan, raw, out_dir, progress
        self._files: Files | None = None  # decode's: interrupted on a failure
        largest_row = max((job.row_numel for job in plan.jobs), default=1)
        stored = [(b.stop - b.start) * job.row_numel for job in plan.jobs if isinstance(job.other, CompactTensor)
                  for b in job.other.blocks]  # fmt: skip
        elements = max(BLOCK_ELEMENTS, largest_row, *stored)  # version 1 wrote blocks of 4M values
        self._ring = [_Buffers.allocate(elements) for _ in range(RING_DEPTH)]
        self._local = threading.local()

    def encode(self, tuned: Checkpoint, *, skip: frozenset[str], on_tensor, on_shard) -> None:
        """Write every ``.wdc`` file of the plan not in ``skip``."""

        def read(block: _Block, buffers: _Buffers):
            return tuned.read_rows(block.job.other, block.start, block.stop, out=buffers.other)

        def work(block: _Block, buffers: _Buffers, raw, values) -> tuple[torch.Tensor, memoryview, bool]:
            return values, self._codec(BlockEncoder).encode(values, raw, out=buffers.payload), _nonfinite(values)

        with self._lanes(ENCODE_WORKERS) as lanes:
            for shard in self.plan.shards:
                if shard.file_name in skip:
                    self.progress(shard.nbytes)
                    continue
                writer = ContainerWriter(self.out_dir, shard.file_name, CODEC)
                try:
                    tensors = _TensorHashes(lanes.tensor_hash, on_tensor)
                    for block, buffers, (values, payload, odd) in self._in_order(
                        lanes, self._read_raw, read, work, _blocks(shard)
                    ):
                        job = block.job
                        if block.index == 0:
                            buffers.pending.append(lanes.write.submit(
                                writer.begin_tensor, job.name, job.out_dtype, job.out_shape,
                                job.raw and job.raw.dtype, job.raw_rows))  # fmt: skip
                        buffers.pending += [
                            tensors.add(block, tensor_bytes(values), odd),
                            lanes.write.submit(writer.add_block, block.start, block.stop, payload),
                            lanes.hash.submit(writer.hash_block, payload),
                        ]
                        self.progress(block.numel * job.out_dtype.itemsize)
                    tensors.report(wait=True)
                    lanes.hash.submit(writer.hash_block, b"").result()  # the lane is ordered: every block is in
                    lanes.write.submit(writer.finish).result()
                except BaseException:
                    self._drain()
                    writer.abort()
                    raise
                on_shard(shard.file_name, writer.sha256.hexdigest())

    def decode(self, files: Files, *, skip: frozenset[str], on_tensor, on_shard) -> None:
        """Write every safetensors shard of the plan not in ``skip``, each tensor bit for bit as the publisher's,
        from the ``.wdc`` files ``files`` gives (a folder's, or the hub's as they download, in the order read)."""
        readers: dict[Path, ContainerReader] = {}
        shards = [shard for shard in self.plan.shards if shard.file_name not in skip]
        last = {block.job.other.file: (block.job.name, block.index) for s in shards for block in _stored_blocks(s)}
        self._files = files
        files.read_in(list(last))

        # The read lanes also do the work that needs only what they read (zstd on the payload, the cast on the raw
        # rows), so the codec thread only joins; the two SHA-256 passes (the tensors for the manifest, the file for
        # SHA256SUMS) run on lanes of their own.
        def read(block: _Block, buffers: _Buffers) -> np.ndarray:
            entry = block.job.other
            if entry.file not in readers:
                readers[entry.file] = files.open(entry.file)
            payload = readers[entry.file].read_block(entry.blocks[block.index], out=buffers.payload)
            if last[entry.file] == (entry.name, block.index):  # its bytes are in memory
                readers.pop(entry.file).close()
                files.done_with(entry.file)
            with _damage(block):
                return self._codec(BlockDecoder).unpack(
                    payload, block.numel, block.job.out_dtype.itemsize, entry.version, out=buffers.sections
                )

        def read_raw(block: _Block, buffers: _Buffers) -> torch.Tensor | None:
            raw = self._read_raw(block, buffers)
            return None if raw is None else cast_to(raw, block.job.out_dtype, self._codec(Scratch), out=buffers.cast)

        def work(block: _Block, buffers: _Buffers, cast, sections) -> tuple[torch.Tensor, bool]:
            count = block.numel * block.job.out_dtype.itemsize
            out = buffers.other[:count].view(block.job.out_dtype).view(block.shape)
            with _damage(block):
                values = self._codec(BlockDecoder).finish(sections, cast, out, block.job.other.version)
            return values, _nonfinite(values)

        try:
            with self._lanes(workers=1) as lanes:
                for shard in self.plan.shards:
                    if shard.file_name in skip:
                        self.progress(shard.nbytes)
                        continue
                    self._decode_shard(shard, lanes, (read_raw, read, work), on_tensor, on_shard)
        finally:
            for reader in readers.values():
                reader.close()

    def _decode_shard(self, shard: ShardPlan, lanes: _Lanes, steps, on_tensor, on_shard) -> None:
        writer = ShardWriter(self.out_dir, shard)
        file_hash = hashlib.sha256(writer.header)
        tensors = _TensorHashes(lanes.tensor_hash, on_tensor)

        try:
            for block, buffers, (values, odd) in self._in_order(lanes, *steps, _stored_blocks(shard)):
                data = tensor_bytes(values)
                # Each hash on a lane of its own, in block order; the write waits on the disk, the hashes need not.
                buffers.pending += [
                    tensors.add(block, data, odd),
                    lanes.hash.submit(file_hash.update, data),
                    lanes.write.submit(writer.write, data),
                ]
                self.progress(len(data))
            tensors.report(wait=True)  # every tensor checked before the shard takes its name
            digest = lanes.hash.submit(file_hash.hexdigest)  # the lane is ordered: after every block's update
            lanes.write.submit(writer.finish).result()
        except BaseException:
            self._drain()
            writer.abort()
            raise
        on_shard(shard.file_name, digest.result())

    def _read_raw(self, block: _Block, buffers: _Buffers) -> torch.Tensor | None:
        if not block.against_raw:
            return None
        return self.raw.read_rows(block.job.raw, block.start, block.stop, out=buffers.raw)

    def _codec(self, kind: type):
        """Return this thread's encoder or decoder (zstd contexts are not shared between threads)."""
        codec = getattr(self._local, kind.__name__, None)
        if codec is None:
            codec = kind()
            setattr(self._local, kind.__name__, codec)
        return codec

    @contextlib.contextmanager
    def _lanes(self, workers: int) -> Iterator[_Lanes]:
        threads = torch.get_num_threads()  # a lane's setting reaches threads started later: put it back after
        lanes = _Lanes(
            read=_lane("read"),
            raw=_lane("read-raw"),
            codec=_lane("codec", workers),
            hash=_lane("hash"),
            tensor_hash=_lane("tensor-hash"),
            write=_lane("write"),
        )
        try:
            yield lanes
        finally:
            for lane in (lanes.read, lanes.raw, lanes.codec, lanes.hash, lanes.tensor_hash, lanes.write):
                lane.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)

    def _drain(self) -> None:
        """After a failure: let every lane finish with the ring, so a file can be removed safely."""
        if self._files is not None:
            self._files.interrupt()  # a read waiting for a download gives up at once
        for buffers in self._ring:
            with contextlib.suppress(BaseException):  # the first failure is already on its way up
                buffers.wait()

    def _in_order(
        self, lanes: _Lanes, read_raw: Callable, read: Callable, work: Callable, blocks: Iterator[_Block]
    ) -> Iterator[tuple]:
        """Yield ``(block, buffers, work(block, buffers, read_raw(block, buffers), read(block, buffers)))`` in block
        order.

        Reads run ahead on their lanes, work on the codec threads; a ring slot is given to a new block only when
        the caller and every lane are done with its previous one.
        """
        ring = self._ring
        pending: deque = deque()
        for index, block in enumerate(blocks):
            if len(pending) == len(ring) - 1:
                done, buffers, future = pending.popleft()
                yield done, buffers, future.result()
            buffers = ring[index % len(ring)]
            buffers.wait()
            raw = lanes.raw.submit(read_raw, block, buffers)
            rows = lanes.read.submit(read, block, buffers)
            future = lanes.codec.submit(_after, raw, rows, work, block, buffers)
            buffers.pending += [raw, rows, future]
            pending.append((block, buffers, future))
        while pending:
            done, buffers, future = pending.popleft()
            yield done, buffers, future.result()


@dataclass(frozen=True)
class _Lanes:
    read: ThreadPoolExecutor
    raw: ThreadPoolExecutor
    codec: ThreadPoolExecutor
    hash: ThreadPoolExecutor  # the output file, for SHA256SUMS
    tensor_hash: ThreadPoolExecutor  # each tensor, for the manifest
    write: ThreadPoolExecutor


def _lane(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """Return a lane whose threads run torch on one thread each: the lanes already fill the cores, and torch's own
    OpenMP threads on top made casts 3-10x slower here, their workers spinning between calls (2.4 s of a float32
    tune's 13 s recovery, the raw lane's cast; measured). OpenMP's thread count is per calling thread."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=f"weight-diff-{name}", initializer=torch.set_num_threads, initargs=(1,)
    )


def _after(raw: Future, rows: Future, work: Callable, block: _Block, buffers: _Buffers):
    return work(block, buffers, raw.result(), rows.result())


def check_blocks(path: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(tensor, problem)`` for each tensor of a compact file, problem "" when every block decodes and
    matches its checksum; a damaged block is named with its rows and offset."""
    decoder = BlockDecoder()
    with ContainerReader(path) as reader:
        buffer = torch.empty(0, dtype=torch.uint8)
        for entry in reader.tensors.values():
            problem = ""
            for index, block in enumerate(entry.blocks):
                shape = rows_shape(entry.shape, block.start, block.stop)
                nbytes = (block.stop - block.start) * entry.row_numel * entry.dtype.itemsize
                if buffer.numel() < nbytes:
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                try:
                    out = buffer[:nbytes].view(entry.dtype).view(shape)
                    decoder.decode(reader.read_block(block), None, out, entry.version)
                except BlockError as exc:
                    where = f"rows {block.start}:{block.stop}, offset {block.offset}"
                    problem = f"block {index} ({where}) is damaged: {exc}"
                    break
            yield entry.name, problem
