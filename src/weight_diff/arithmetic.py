"""The per-block math of recover (raw + diff) and make-diff (tuned - raw), always in float32.

Added vocabulary rows (LLaMA's ``<pad>``) have no raw counterpart; like the 2023 open-instruct and Alpaca scripts,
they start from the mean of the raw rows. The mean is accumulated in float64 over row blocks and rounded once to
float32, so it does not depend on how the rows were blocked.
"""

from __future__ import annotations

import torch


class RowMean:
    """Running mean of a tensor's rows, fed block by block, for the rows a tuned model added."""

    def __init__(self, row_shape: tuple[int, ...]) -> None:
        self._sum = torch.zeros(row_shape, dtype=torch.float64)
        self._count = 0

    def add(self, rows: torch.Tensor) -> None:
        self._sum += rows.sum(dim=0, dtype=torch.float64)
        self._count += rows.shape[0]

    def value(self) -> torch.Tensor:
        """Return the float32 mean row (shape ``(1, *row_shape)``)."""
        if not self._count:
            raise ValueError("mean of zero rows")
        return (self._sum / self._count).to(torch.float32).unsqueeze(0)


def recover_rows(raw: torch.Tensor, diff: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Return ``raw + diff`` in float32, computed into ``out`` (a reused buffer of the block's shape).

    For added vocabulary rows, ``raw`` is the mean raw row expanded to the block.
    """
    out.copy_(raw)
    out.add_(diff)
    return out


def diff_rows(raw: torch.Tensor, tuned: torch.Tensor, diff_out: torch.Tensor, result_out: torch.Tensor) -> None:
    """Fill ``diff_out`` with ``tuned - raw`` and ``result_out`` with ``raw + diff``, what recover will compute.

    For added vocabulary rows, ``raw`` is the mean raw row expanded to the block.
    """
    result_out.copy_(raw)
    diff_out.copy_(tuned)
    diff_out.sub_(result_out)
    result_out.add_(diff_out)
