"""The per-block math of recover (raw + diff, in the family's dtype) and make-diff (tuned - raw, in float32).

Added vocabulary rows (LLaMA's ``<pad>``) have no raw counterpart; like the 2023 open-instruct and Alpaca scripts,
they start from the mean of the raw rows. The mean is accumulated in float64 over row blocks and rounded once to
float32, so it does not depend on how the rows were blocked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def finite_range(values: torch.Tensor) -> tuple[float, float] | None:
    """Return a block's lowest and highest value, None when it holds NaN or Inf (what a run warns about).

    One ``aminmax`` pass: NaN and Inf reach the min or the max.
    """
    low, high = (float(v) for v in torch.aminmax(values))
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


class RowMean:
    """Running mean of a tensor's rows, fed block by block, for the rows a tuned model added.

    The sum is kept in float64, where sums of float16 weights are exact: the mean is then the same on every
    machine and for every blocking, as the manifest's hashes require.
    """

    def __init__(self, row_shape: tuple[int, ...]) -> None:
        self._sum = torch.zeros(row_shape, dtype=torch.float64)
        self._count = 0
        self._buffer = torch.empty(0, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        # Widening into a reused float64 buffer, then summing, is 2.5x faster than sum(dtype=float64).
        if self._buffer.numel() < rows.numel():
            self._buffer = torch.empty(rows.numel(), dtype=torch.float64)
        wide = self._buffer[: rows.numel()].view(rows.shape)
        wide.copy_(rows)
        self._sum += wide.sum(dim=0)
        self._count += rows.shape[0]

    def value(self) -> torch.Tensor:
        """Return the float32 mean row (shape ``(1, *row_shape)``)."""
        if not self._count:
            raise ValueError("mean of zero rows")
        return (self._sum / self._count).to(torch.float32).unsqueeze(0)


def recover_rows(
    raw: torch.Tensor | None, diff: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Return ``raw + diff`` in ``out``'s dtype (the family's arithmetic), computed into ``out``.

    Both sides are first cast to that dtype, as the publishers' scripts loaded both models with
    ``from_pretrained(torch_dtype=...)``, then added: in float16 that is one rounding of the exact sum, exactly
    what ``param.data += delta`` gave. ``raw`` is None where the diff holds the result itself; for added
    vocabulary rows it is the fill row (mean or zero) expanded to the block. ``scratch``: a reused buffer like
    ``out`` for the cast diff.
    """
    if raw is None:
        out.copy_(diff)
        return out
    out.copy_(raw)
    if diff.dtype != out.dtype and out.dtype != torch.float32:  # float32 add_ widens exactly by itself
        diff = scratch.copy_(diff) if scratch is not None else diff.to(out.dtype)
    out.add_(diff)
    return out


def torch_row_mean(
    read_rows: Callable[[int, int], torch.Tensor], *, rows: int, width: int, budget: int, rows_per_read: int
) -> torch.Tensor:
    """Return ``rows.float().mean(dim=0, keepdim=True)`` exactly as torch computes it on the whole tensor.

    Alpaca's and open-instruct's scripts filled added rows with torch's float32 mean, whose rounding depends on
    torch's summation order (it differs from the exact mean in most columns at LLaMA's size). Torch reduces each
    column on its own, so the mean of a band of columns (a multiple of 64 wide) equals those columns of the
    whole mean: bands of at most ``budget`` elements are filled from blocks of ``rows_per_read`` rows and reduced,
    in flat memory.
    """
    band = max(64, budget // max(rows, 1) // 64 * 64)
    step = max(1, rows_per_read)
    mean = torch.empty((1, width), dtype=torch.float32)
    strip = torch.empty(rows * min(band, width), dtype=torch.float32)
    for low in range(0, width, band):
        high = min(low + band, width)
        columns = strip[: rows * (high - low)].view(rows, high - low)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            columns[start:stop].copy_(read_rows(start, stop).reshape(stop - start, width)[:, low:high])
        mean[:, low:high] = columns.mean(dim=0, keepdim=True)
    return mean


def diff_rows(raw: torch.Tensor, tuned: torch.Tensor, diff_out: torch.Tensor, result_out: torch.Tensor) -> None:
    """Fill ``diff_out`` with ``tuned - raw`` and ``result_out`` with ``raw + diff``, what recover will compute.

    For added vocabulary rows, ``raw`` is the mean raw row expanded to the block.
    """
    result_out.copy_(raw)
    diff_out.copy_(tuned)
    diff_out.sub_(result_out)
    result_out.add_(diff_out)
