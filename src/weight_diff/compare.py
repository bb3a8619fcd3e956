"""Compare two models tensor by tensor: which tensors are missing or mis-shaped, how far apart the values are.

What a user runs when they hold a reference copy of the tuned model. Both checkpoints are streamed in row blocks
of bounded size, so comparing two 13B models needs a few hundred MB of memory, not 100 GB.

>>> report = compare_models("self-instruct-13b", "reference/self-instruct-13b", tol=1e-6)
>>> report.agrees, report.max_abs_diff
(True, 1.8e-12)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import UsageError
from .manifest import dtype_name
from .sources import meta

BLOCK_BYTES = 16 * 2**20  # per side and block: bounded memory, large enough for fast reads
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorComparison:
    """One tensor present in both models: shapes, dtypes, the largest |a - b| and how many values are identical.

    ``max_abs_diff`` and ``identical`` are None when the shapes differ (nothing was compared). Values are
    identical when their bits are (same dtype) or when they are equal numbers (different dtypes).
    """

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    max_abs_diff: float | None
    identical: int | None
    numel: int

    @property
    def same_shape(self) -> bool:
        return self.shape_a == self.shape_b

    @property
    def identical_share(self) -> float | None:
        if self.identical is None:
            return None
        return self.identical / self.numel if self.numel else 1.0

    def agrees(self, tol: float) -> bool:
        """Return whether the tensors match: bit for bit at ``tol == 0`` (same dtype), else within ``tol``."""
        if not self.same_shape or self.max_abs_diff is None:
            return False
        if tol == 0 and self.dtype_a == self.dtype_b:
            return self.identical == self.numel
        return self.max_abs_diff <= tol


@dataclass(frozen=True)
class Comparison:
    """The whole comparison of model ``a`` with model ``b``, and whether they agree within ``tol``."""

    a: Path
    b: Path
    tol: float
    tensors: tuple[TensorComparison, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]

    @property
    def disagreeing(self) -> list[TensorComparison]:
        return [t for t in self.tensors if not t.agrees(self.tol)]

    @property
    def agrees(self) -> bool:
        return not self.only_in_a and not self.only_in_b and not self.disagreeing

    @property
    def max_abs_diff(self) -> float | None:
        """Return the largest |a - b| over all tensors of matching shape (None when there were none)."""
        diffs = [t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None]
        return max(diffs) if diffs else None

    @property
    def identical_share(self) -> float | None:
        compared = [t for t in self.tensors if t.identical is not None]
        total = sum(t.numel for t in compared)
        if not compared:
            return None
        return sum(t.identical for t in compared) / total if total else 1.0

    def worst(self, count: int) -> list[TensorComparison]:
        """Return up to ``count`` tensors, mis-shaped first, then by largest difference, then by fewest identical."""

        def badness(t: TensorComparison) -> tuple:
            if t.max_abs_diff is None:
                return (1, math.inf, 0.0)
            return (0, t.max_abs_diff, -(t.identical_share or 0.0))

        return sorted(self.tensors, key=badness, reverse=True)[:count]

    def lines(self, worst: int = 10) -> list[str]:
        """Return the report as text: unmatched tensors, the worst tensors as a table, overall figures, verdict."""
        out = [f"A: {self.a}", f"B: {self.b}", f"{len(self.tensors)} tensors in both"]
        for side, names in (("A", self.only_in_a), ("B", self.only_in_b)):
            if names:
                out.append(f"only in {side} ({len(names)}): {_first(names)}")
        mis_shaped = [t for t in self.tensors if not t.same_shape]
        for t in mis_shaped[:worst]:
            out.append(f"shape differs: {t.name}: A {list(t.shape_a)}, B {list(t.shape_b)}")
        dtypes = {(t.dtype_a, t.dtype_b) for t in self.tensors if t.dtype_a != t.dtype_b}
        for dtype_a, dtype_b in sorted(dtypes):
            out.append(f"dtype differs: A {dtype_a}, B {dtype_b} (values compared as numbers)")
        shown = [t for t in self.worst(worst) if t.identical is not None and t.identical < t.numel]
        if shown:
            width = max(len(t.name) for t in shown)
            out.append(f"{'tensor':<{width}}  {'max |A-B|':>10}  {'identical':>9}")
            for t in shown:
                out.append(f"{t.name:<{width}}  {t.max_abs_diff:>10.3e}  {t.identical_share:>9.2%}")
        if self.max_abs_diff is not None:
            out.append(f"overall: max |A-B| = {self.max_abs_diff:.3e}; {self.identical_share:.4%} of values identical")
        tolerance = "0 (bit-exact)" if self.tol == 0 else f"{self.tol:g}"
        if self.agrees:
            out.append(f"agree: every tensor matches within tolerance {tolerance}")
        else:
            problems = []
            if self.only_in_a or self.only_in_b:
                problems.append(f"{len(self.only_in_a) + len(self.only_in_b)} tensors are in one model only")
            if mis_shaped:
                problems.append(f"{len(mis_shaped)} differ in shape")
            exceeding = len(self.disagreeing) - len(mis_shaped)
            if exceeding:
                problems.append(f"{exceeding} of {len(self.tensors)} exceed tolerance {tolerance}")
            out.append("DIFFER: " + "; ".join(problems))
        return out


def compare_models(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    tol: float = 0.0,
    block_bytes: int = BLOCK_BYTES,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    verify_md5: bool = True,
) -> Comparison:
    """Return the comparison of every tensor of the checkpoints in ``path_a`` and ``path_b``.

    ``on_total`` is told how many bytes of A will be read, then ``progress`` each block's byte count.
    """
    if not tol >= 0:  # also refuses NaN
        raise UsageError(f"--tol {tol}: give a tolerance of 0 or more")
    with (
        Checkpoint.open(path_a, hidden_size=meta.size_hint(path_b), verify_md5=verify_md5) as a,
        Checkpoint.open(path_b, hidden_size=meta.size_hint(path_a), verify_md5=verify_md5) as b,
    ):
        common = [name for name in a.tensors if name in b.tensors]
        if on_total is not None:
            on_total(sum(a.tensors[n].nbytes for n in common if a.tensors[n].shape == b.tensors[n].shape))
        blocks = _Blocks(block_bytes)
        tensors = tuple(
            _compare_tensor(a, b, a.tensors[name], b.tensors[name], blocks, progress or (lambda nbytes: None))
            for name in common
        )
        return Comparison(
            a=a.directory,
            b=b.directory,
            tol=tol,
            tensors=tensors,
            only_in_a=tuple(n for n in a.tensors if n not in b.tensors),
            only_in_b=tuple(n for n in b.tensors if n not in a.tensors),
        )


class _Blocks:
    """Two byte buffers reused for every block of every tensor; grown only for a single row larger than them."""

    def __init__(self, block_bytes: int) -> None:
        self.capacity = max(1, block_bytes)
        self.a = torch.empty(self.capacity, dtype=torch.uint8)
        self.b = torch.empty(self.capacity, dtype=torch.uint8)

    def rows_per_block(self, info_a: TensorInfo, info_b: TensorInfo) -> int:
        row_bytes = info_a.row_numel * max(info_a.dtype.itemsize, info_b.dtype.itemsize)
        if row_bytes > self.capacity:
            self.capacity = row_bytes
            self.a = torch.empty(row_bytes, dtype=torch.uint8)
            self.b = torch.empty(row_bytes, dtype=torch.uint8)
        return max(1, self.capacity // max(1, row_bytes))


def _compare_tensor(
    a: Checkpoint,
    b: Checkpoint,
    info_a: TensorInfo,
    info_b: TensorInfo,
    blocks: _Blocks,
    progress: Callable[[int], None],
) -> TensorComparison:
    max_diff: float | None = None
    identical: int | None = None
    if info_a.shape == info_b.shape:
        max_diff, identical = 0.0, 0
        step = blocks.rows_per_block(info_a, info_b)
        for start in range(0, info_a.rows, step):
            stop = min(start + step, info_a.rows)
            rows_a = a.read_rows(info_a, start, stop, out=blocks.a)
            rows_b = b.read_rows(info_b, start, stop, out=blocks.b)
            block_diff, block_identical = _compare_block(rows_a, rows_b)
            max_diff = max(max_diff, block_diff)
            identical += block_identical
            progress(rows_a.numel() * rows_a.element_size())
    return TensorComparison(
        name=info_a.name,
        shape_a=info_a.shape,
        shape_b=info_b.shape,
        dtype_a=dtype_name(info_a.dtype),
        dtype_b=dtype_name(info_b.dtype),
        max_abs_diff=max_diff,
        identical=identical,
        numel=info_a.numel,
    )


def _compare_block(rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[float, int]:
    """Return the largest |a - b| of one block and how many of its values are identical.

    A NaN facing a number counts as an infinite difference; two NaNs, or two equal infinities, as none.
    """
    same_dtype = rows_a.dtype == rows_b.dtype
    if same_dtype:
        width = _SAME_WIDTH_INT[rows_a.dtype.itemsize]
        identical = int((rows_a.view(width) == rows_b.view(width)).sum())
        if identical == rows_a.numel():
            return 0.0, identical
    wide = torch.float64 if torch.float64 in (rows_a.dtype, rows_b.dtype) else torch.float32
    values_a, values_b = rows_a.to(wide), rows_b.to(wide)
    if not same_dtype:
        identical = int((values_a == values_b).sum())
    diff = (values_a - values_b).abs_()
    largest = diff.max().item() if diff.numel() else 0.0
    if math.isnan(largest):  # rare: only blocks holding NaN, or infinities of the same sign, pay for this
        both_nan = values_a.isnan() & values_b.isnan()
        if not same_dtype:
            identical += int(both_nan.sum())
        diff.masked_fill_((values_a == values_b) | both_nan, 0).nan_to_num_(nan=math.inf)
        largest = diff.max().item()
    return largest, identical


def _first(names: tuple[str, ...], count: int = 3) -> str:
    more = f", ... ({len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more
