"""The compact diff's per-block code: the tuned bits XOR the raw bits cast to the tuned dtype, bytes split by
significance, then zstd. Pure: tensors in, bytes out (and back), no files.

Fine-tuning leaves the sign, the exponent and the top mantissa bits of almost every weight as they were, so the
XOR is mostly zero bits in its high bytes. Version 3 (written now) stores a block's residual as sections:

    steps       one byte per entry: how far its value is from the previous entry's (the first entry's from -1);
                a step over 255 is taken in entries of 255 whose highest byte is zero
    top         each entry's highest byte (87% of a fine-tune's values have it zero and get no entry)
    second      the second-highest byte of every value
    low         (4- and 8-byte dtypes) the remaining low bytes of every value, as stored (little-endian)

Versions 1 and 2 are still read. Version 2 marked the values with a highest byte in a bitmap (ceil(n/8) bytes,
most significant bit first) instead of steps: as small, but finding the marked values in it took 1.1 ms of a
float32 block's 6 ms of decode, where a running sum of the steps takes 0.26 ms. Version 1 grouped every byte plane whole
(all highest bytes, then the next, down to the lowest) in one zstd frame. Versions 2 and 3 write two frames, the
sparse part (steps or bitmap, and top) entropy-coded, the rest stored (near-random mantissa bytes: entropy coding
saved little and cost most of zstd's time). Every frame carries its content checksum (XXH64 of its decoded
bytes), so a damaged block is caught when it is decoded, and named.

>>> encoder = BlockEncoder()
>>> payload = encoder.encode(tuned_rows, raw_rows, out=buffer)  # raw_rows None: the rows are stored as they are
>>> torch.equal(BlockDecoder().decode(payload, raw_rows, out=buffer).view(torch.int16), tuned_rows.view(torch.int16))
True
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

# The integer view of each float dtype the codec reads: XOR works on the stored bits.
BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}
VERSION = 3  # the block layout written; versions 1 and 2 are still read
# Steps (or the bitmap) and the highest bytes: zstd's level 1 ("fast" strategy) with a 128 KiB window, a 256-entry
# hash table and 7-byte minimum matches (as small as level 1 and 18% faster on them: no long repeats to find).
SPARSE_PARAMETERS = {"strategy": "fast", "window_log": 17, "hash_log": 8, "min_match": 7, "target_length": 0}
# The second-highest and low bytes: the same with target length 1, which (as zstd's negative levels) stores literals
# without entropy coding. Huffman saved 10% of the second byte's size at 60% of the block's zstd time both ways.
DENSE_PARAMETERS = {**SPARSE_PARAMETERS, "target_length": 1}


def sections_nbytes(count: int, itemsize: int) -> int:
    """Return the most bytes a block's sections take: every value's bytes, and a step byte for at most every value
    (each entry moves at least one value on; version 2's bitmap takes less)."""
    return count * (itemsize + 1)


def payload_capacity(count: int, itemsize: int) -> int:
    """Return the most bytes a block of ``count`` values can encode to: its sections, plus zstd's worst case for
    data it cannot compress (1/256 more, and a frame header, block headers and checksum) for each of two frames."""
    sections = sections_nbytes(count, itemsize)
    return sections + sections // 128 + 2 * 2**16


class BlockError(ValueError):
    """A block's bytes do not decode to what was stored (its checksum or its frame is damaged)."""


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's bits as a signed integer tensor of the same itemsize (a view, no copy)."""
    return tensor.view(BITS_DTYPES[tensor.dtype.itemsize])


class Scratch:
    """Reused work buffers for one thread: first touch of fresh memory costs more than the XOR itself."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._buffers[name] = buffer
        return buffer[:nbytes]


def residual_bits(tuned: torch.Tensor, raw: torch.Tensor | None, scratch: Scratch) -> torch.Tensor:
    """Return tuned's bits XOR the bits of ``raw`` cast to tuned's dtype (tuned's bits when raw is None)."""
    bits = bits_of(tuned)
    if raw is None:
        return bits
    cast_bits = bits_of(cast_to(raw, tuned.dtype, scratch))
    return torch.bitwise_xor(bits, cast_bits, out=cast_bits)


def cast_to(raw: torch.Tensor, dtype: torch.dtype, scratch: Scratch, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``raw`` cast to ``dtype`` (round to nearest even) in ``out`` (bytes) or a reused buffer.

    Between the two half-precision dtypes the cast goes through float32, at 3x the speed of the direct cast
    (measured: 1.4 GB/s direct, 4.8 GB/s the two vectorised steps). The first step is exact, and the second rounds
    finite values as the direct cast does (tests check every value of both dtypes); NaN bits differ between the
    two paths, so a block whose sum is not finite takes the direct cast.
    """
    nbytes = raw.numel() * dtype.itemsize
    cast = (scratch.get("cast", nbytes) if out is None else out[:nbytes]).view(dtype).view(raw.shape)
    if raw.dtype.itemsize == 2 and dtype.itemsize == 2 and raw.dtype != dtype:
        wide = scratch.get("wide", raw.numel() * 4).view(torch.float32).view(raw.shape)
        if torch.isfinite(wide.copy_(raw).sum()):
            return cast.copy_(wide)
    return cast.copy_(raw)


def split_residual(bits: torch.Tensor, out: torch.Tensor) -> tuple[np.ndarray, int]:
    """Return the residual's sections (version 3: steps, top, second, low) written into ``out``, which holds at
    least :func:`sections_nbytes` bytes, and where the sparse part (steps and top) ends.

    Coding the highest byte sparsely halves zstd's time on it (zstd spends it on short runs of zeros) and stores it
    in 0.12 instead of 0.19 bytes a value (measured on a modelled 13B-width fine-tune, README).
    """
    width, count = bits.dtype.itemsize, bits.numel()
    values = bits.reshape(-1).numpy().view(_UNSIGNED[width])
    shift = 8 * (width - 1)
    sections = out.numpy()
    where = np.flatnonzero(values > (1 << shift) - 1)  # the values whose highest byte is not zero
    steps = np.empty(len(where), dtype=np.int64)
    steps[:1] = where[:1] + 1
    np.subtract(where[1:], where[:-1], out=steps[1:])
    if not len(steps) or steps.max() <= 255:
        entries = len(where)
        np.copyto(sections[:entries], steps, casting="unsafe")
        np.right_shift(values[where], shift, out=sections[entries : 2 * entries], casting="unsafe")
    else:
        fillers = (steps - 1) // 255  # entries of 255 that a longer step takes before its own
        entries = len(where) + int(fillers.sum())
        own = np.arange(len(where)) + np.cumsum(fillers)  # each value's own entry, after its fillers
        sections[:entries] = 255
        sections[own] = steps - 255 * fillers
        sections[entries : 2 * entries] = 0
        sections[entries + own] = values[where] >> shift
    end = sparse_end = 2 * entries
    # The second-highest byte: the low byte of each value's top two bytes (an unsigned cast keeps the low byte).
    high = values.view(np.uint16).reshape(count, width // 2)[:, -1]
    np.copyto(sections[end : end + count], high, casting="unsafe")
    end += count
    if width > 2:  # the low bytes kept together: one strided copy of 2-byte words costs less than byte planes
        words = width // 2 - 1
        low = sections[end : end + 2 * words * count].view(np.uint16).reshape(count, words)
        np.copyto(low, values.view(np.uint16).reshape(count, width // 2)[:, :words])
        end += 2 * words * count
    return sections[:end], sparse_end


def join_residual(sections: np.ndarray, out_bits: torch.Tensor) -> torch.Tensor:
    """Return ``out_bits`` filled from sections made by :func:`split_residual` (the inverse).

    Raises BlockError when the sections' length does not fit the block or a step leads past its end (a frame that
    decoded to other bytes).
    """
    width, count = out_bits.dtype.itemsize, out_bits.numel()
    sparse = len(sections) - (width - 1) * count
    if sparse < 0 or sparse % 2:
        raise BlockError(f"decodes to {len(sections)} bytes, which no block of {count} values takes")
    entries = sparse // 2
    _fill_low_bytes(sections[sparse:], out_bits)
    if entries:
        # A running sum in torch: 5x the speed of numpy's, which widens the bytes to int64 first (measured).
        where = torch.cumsum(torch.from_numpy(sections[:entries]), 0, dtype=torch.int64).numpy()
        where -= 1
        if where[0] < 0 or where[-1] >= count:
            raise BlockError("its steps lead outside the block")
        _store_tops(out_bits, where, sections[entries:sparse])
    return out_bits


def join_bitmap_residual(sections: np.ndarray, out_bits: torch.Tensor) -> torch.Tensor:
    """Return ``out_bits`` filled from version 2's sections (bitmap, top, second, low).

    Raises BlockError when the sections' length disagrees with the bitmap (a frame that decoded to other bytes).
    """
    width, count = out_bits.dtype.itemsize, out_bits.numel()
    mapped = (count + 7) // 8
    if len(sections) < mapped:
        raise BlockError(f"decodes to {len(sections)} bytes, fewer than the block's bitmap")
    where = np.flatnonzero(np.unpackbits(sections[:mapped]).view(bool))
    if len(where) and where[-1] >= count:
        raise BlockError("its bitmap marks values past the block's end")
    end = mapped + len(where)
    expected = end + (width - 1) * count
    if len(sections) != expected:
        raise BlockError(f"decodes to {len(sections)} bytes, expected {expected}")
    _fill_low_bytes(sections[end:], out_bits)
    _store_tops(out_bits, where, sections[mapped:end])
    return out_bits


def _store_tops(out_bits: torch.Tensor, where: np.ndarray, tops: np.ndarray) -> None:
    """Store ``tops`` as the highest bytes of the values at ``where``, zero so far (half the time of or-ing shifted
    values in, measured)."""
    width = out_bits.dtype.itemsize
    out_bits.reshape(-1).numpy().view(np.uint8).reshape(-1, width)[:, -1][where] = tops


def _fill_low_bytes(sections: np.ndarray, out_bits: torch.Tensor) -> None:
    """Fill every value of ``out_bits`` from its second and low sections, with its highest byte zero."""
    width, count = out_bits.dtype.itemsize, out_bits.numel()
    halves = out_bits.reshape(-1).numpy().view(np.uint16).reshape(count, width // 2)
    np.copyto(halves[:, -1], sections[:count])  # the second byte, its highest byte zero
    if width > 2:
        np.copyto(halves[:, :-1], sections[count:].view(np.uint16).reshape(count, width // 2 - 1))


def ungroup_bytes(grouped: torch.Tensor, out_bits: torch.Tensor) -> torch.Tensor:
    """Return ``out_bits`` filled from version 1's byte planes (every value's highest byte, then the next, down to
    the lowest)."""
    width = out_bits.dtype.itemsize
    planes = grouped.numpy().reshape(width, -1)
    if width > 2:  # strided byte copies: 3x the shifts at 4 bytes a value (measured 3.2 against 1.1 GB/s)
        columns = out_bits.reshape(-1).numpy().view(np.uint8).reshape(-1, width)
        for plane in range(width):
            np.copyto(columns[:, width - 1 - plane], planes[plane])
        return out_bits
    values = out_bits.reshape(-1).numpy().view(np.uint16)
    np.copyto(values, planes[0])
    # Shift in the low byte: 2x strided byte copies at 2 bytes a value (measured 6.0 against 3.2 GB/s).
    np.left_shift(values, 8, out=values)
    np.bitwise_or(values, planes[1], out=values)
    return out_bits


class BlockEncoder:
    """Encodes blocks of rows (the current version's layout); one per thread (a zstd context is not shared)."""

    def __init__(self) -> None:
        self._sparse = _compressor(SPARSE_PARAMETERS)
        self._dense = _compressor(DENSE_PARAMETERS)
        self._scratch = Scratch()

    def encode(self, tuned: torch.Tensor, raw: torch.Tensor | None, out: torch.Tensor) -> memoryview:
        """Return two zstd frames holding ``tuned`` relative to ``raw`` (rows of the same shape, or None), written
        into ``out`` (bytes, at least :func:`payload_capacity`): the bitmap and highest bytes, entropy-coded; then
        the other bytes, stored.

        The frames go straight into the caller's buffer: a fresh ``bytes`` for every block (and one more to join
        the two) cost a page fault for each 4 KiB of output on first touch (measured: 46% of make-diff's faults).
        """
        residual = residual_bits(tuned.contiguous(), raw, self._scratch)
        count, itemsize = residual.numel(), residual.dtype.itemsize
        sections, sparse_end = split_residual(residual, self._scratch.get("sections", sections_nbytes(count, itemsize)))
        target = memoryview(out.numpy()).cast("B")[: payload_capacity(count, itemsize)]
        done = _compress_into(self._sparse, sections[:sparse_end], target, 0)
        return target[: _compress_into(self._dense, sections[sparse_end:], target, done)]


def _compress_into(compressor: zstandard.ZstdCompressor, data: np.ndarray, target: memoryview, done: int) -> int:
    """Write one whole frame of ``data`` into ``target`` from ``done``; return where it ends."""
    if not len(data):  # a block with no highest bytes: stream_reader never finishes a frame of nothing (0.25)
        frame = compressor.compress(b"")
        target[done : done + len(frame)] = frame
        return done + len(frame)
    reader = compressor.stream_reader(data, size=len(data))
    while got := reader.readinto(target[done:]):
        done += got
    if reader.read(1):  # unreachable while payload_capacity holds zstd's bound
        raise ValueError(f"a compressed frame outgrew its buffer of {len(target)} bytes")
    return done


def _compressor(parameters: dict) -> zstandard.ZstdCompressor:
    strategies = {"fast": zstandard.STRATEGY_FAST}
    settings = {name: value for name, value in parameters.items() if name != "strategy"}
    return zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters(
            strategy=strategies[parameters["strategy"]], **settings, write_checksum=True, write_content_size=True
        )
    )


class BlockDecoder:
    """Decodes blocks of rows into caller-owned buffers; one per thread."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()
        self._scratch = Scratch()

    def decode(
        self, payload: bytes | memoryview, raw: torch.Tensor | None, out: torch.Tensor, version: int = VERSION
    ) -> torch.Tensor:
        """Return ``out`` (tuned's dtype and the block's shape) filled with the tuned values the payload encodes,
        laid out as ``version`` lays a block out: :meth:`unpack`, then :meth:`finish` against ``raw`` cast.

        Raises BlockError when the frame is damaged or its checksum fails.
        """
        sections = self.unpack(payload, out.numel(), out.dtype.itemsize, version)
        cast = None if raw is None else cast_to(raw, out.dtype, self._scratch)
        return self.finish(sections, cast, out, version)

    def unpack(
        self, payload: bytes | memoryview, count: int, itemsize: int, version: int, out: torch.Tensor | None = None
    ) -> np.ndarray:
        """Return a block's decoded bytes (its sections), in ``out`` (bytes, at least :func:`unpacked_capacity`)
        or a reused buffer; every frame's checksum checked.

        Raises BlockError when a frame is damaged, its checksum fails, or it decodes to more than the block holds.
        """
        limit = unpacked_capacity(count, itemsize, version) - 1
        decoded = self._scratch.get("sections", limit + 1) if out is None else out[: limit + 1]
        view = memoryview(decoded.numpy())  # one byte more than the limit: a longer frame is seen as longer
        done = 0
        try:
            # Read to the last frame's end: zstd checks each frame's content checksum only there.
            reader = self._zstd.stream_reader(payload, read_across_frames=True)
            while done <= limit and (got := reader.readinto(view[done:])):
                done += got
            extra = reader.read(1)  # reaching the frame's end makes zstd check the content checksum
        except zstandard.ZstdError as exc:
            raise BlockError(str(exc)) from None
        if extra or done > limit:
            raise BlockError(f"decodes to more than {limit} bytes")
        return decoded.numpy()[:done]

    def finish(
        self, sections: np.ndarray, cast: torch.Tensor | None, out: torch.Tensor, version: int = VERSION
    ) -> torch.Tensor:
        """Return ``out`` filled from a block's sections XOR ``cast`` (the raw rows already cast to ``out``'s
        dtype; None: no raw).

        Raises BlockError when the sections do not fit the block.
        """
        if version == 1:
            nbytes = out.numel() * out.dtype.itemsize
            if len(sections) != nbytes:
                raise BlockError(f"decodes to {len(sections)} bytes, expected {nbytes}")
            bits = ungroup_bytes(torch.from_numpy(sections), bits_of(out))
        else:
            join = join_bitmap_residual if version == 2 else join_residual
            bits = join(sections, bits_of(out))
        if cast is not None:
            torch.bitwise_xor(bits, bits_of(cast), out=bits)
        return out


def unpacked_capacity(count: int, itemsize: int, version: int = VERSION) -> int:
    """Return the bytes :meth:`BlockDecoder.unpack` needs for a block: the most its sections can take, plus one."""
    return (count * itemsize if version == 1 else sections_nbytes(count, itemsize)) + 1
