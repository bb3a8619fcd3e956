"""Decide everything before a byte is written: which tensors pair up, how many vocab rows are added, output dtypes
and shards. Pure: tensor tables in, a ``Plan`` out, so every refusal can be tested without a disk.

>>> plan = plan_pairs(raw.tensors, diff.tensors, other_role="diff", out_dtype="auto", max_shard_size="5GB")
>>> plan.shards[0].file_name
'model-00001-of-00011.safetensors'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checkpoint import FLOAT_DTYPES, TensorInfo
from .errors import PlanError, UsageError
from .sizes import parse_size

if TYPE_CHECKING:
    from .families import Family

# The only tensors whose first dimension may grow: tokens added to the vocabulary (LLaMA's <pad>).
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LLaMA hidden sizes, to tell a user which model a mismatched checkpoint looks like.
LLAMA_SIZES = {4096: "7B", 5120: "13B", 6656: "30B/33B", 8192: "65B/70B"}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: the raw tensor it builds on, the other input (diff or tuned), and what to write."""

    name: str
    raw: TensorInfo | None  # None: a diff tensor kept as stored (no raw counterpart)
    other: TensorInfo
    out_dtype: torch.dtype
    added_rows: int  # rows the other side has beyond raw's, filled as ``fill`` says
    arithmetic: torch.dtype = torch.float32  # both sides are cast to this before adding
    fill: str = "mean"  # added rows' raw side: "mean", "torch-mean", "zero", or "stored" (diff rows as they are)
    absolute: bool = False  # the diff holds the result itself: copied, never added

    @property
    def raw_rows(self) -> int:
        """Rows that are raw + diff; the rest come from ``fill`` (all of them when the tensor is absolute)."""
        return 0 if self.absolute or self.raw is None else self.raw.rows

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.other.shape

    @property
    def out_nbytes(self) -> int:
        return self.other.numel * self.out_dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the jobs whose tensors it holds, in write order."""

    file_name: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(job.out_nbytes for job in self.jobs)


@dataclass(frozen=True)
class Plan:
    """All that a run will do: shards in order, each with its jobs."""

    shards: tuple[ShardPlan, ...]

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for shard in self.shards for job in shard.jobs]

    @property
    def total_size(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    @property
    def weight_map(self) -> dict[str, str]:
        return {job.name: shard.file_name for shard in self.shards for job in shard.jobs}

    @property
    def dtype(self) -> torch.dtype:
        """The output's dtype, as config.json states it: the most common one by bytes."""
        by_bytes: dict[torch.dtype, int] = {}
        for job in self.jobs:
            by_bytes[job.out_dtype] = by_bytes.get(job.out_dtype, 0) + job.out_nbytes
        return max(by_bytes, key=by_bytes.__getitem__)


def plan_pairs(
    raw: dict[str, TensorInfo],
    other: dict[str, TensorInfo],
    *,
    other_role: str,
    out_dtype: str,
    max_shard_size: str | int,
    family: Family | None = None,
) -> Plan:
    """Return the plan pairing every tensor of ``other`` (a diff or a tuned model) with its raw tensor.

    ``family`` (recover only) says how its publisher's script treats each tensor: the arithmetic dtype, how added
    rows are filled, which tensors are absolute or kept without a raw counterpart. Refuses, naming the tensors,
    when either side has tensors the other lacks, when shapes differ other than the family allows, or when a
    tensor is not floating point.
    """
    missing = [name for name in other if name not in raw and not (family and family.keeps_unpaired(name))]
    extra = [name for name in raw if name not in other]
    if missing or extra:
        raise PlanError(_describe_unmatched(missing, extra, other_role))
    jobs = []
    for name, info in other.items():
        base = raw.get(name)
        for side, tensor in (("raw", base), (other_role, info)):
            if tensor is not None and tensor.dtype not in FLOAT_DTYPES:
                raise PlanError(f"{side} tensor {name} is {tensor.dtype}, not floating point: not model weights")
        dtype = _resolve_dtype(out_dtype, family.arithmetic if family else info.dtype)
        if family is None:
            added = _added_rows(base, info, other_role, raw, other)
            jobs.append(TensorJob(name=name, raw=base, other=info, out_dtype=dtype, added_rows=added))
        else:
            jobs.append(_family_job(family, name, base, info, dtype, raw, other))
    return Plan(shards=plan_shards(jobs, parse_size(max_shard_size)))


def _family_job(
    family: Family,
    name: str,
    base: TensorInfo | None,
    info: TensorInfo,
    dtype: torch.dtype,
    raw: dict[str, TensorInfo],
    other: dict[str, TensorInfo],
) -> TensorJob:
    """Return the job for one diff tensor under a family's rule."""
    job = functools.partial(TensorJob, name=name, raw=base, other=info, out_dtype=dtype, arithmetic=family.arithmetic)
    if base is None or family.is_absolute(name):
        return job(added_rows=0, absolute=True)
    if base.shape == info.shape:
        return job(added_rows=0, fill=family.added_rows or "mean")
    try:
        added = _added_rows(base, info, "diff", raw, other)
    except PlanError:
        if family.resized_absolute:
            return job(added_rows=0, absolute=True)
        raise
    if family.added_rows is None:
        raise PlanError(
            f"tensor {name}: the diff has {added} vocabulary rows more than raw, which the {family.title} rule "
            "never adds; give the raw model the diff was made from, or choose the diff's family with --family"
        )
    return job(added_rows=added, fill=family.added_rows)


def _describe_unmatched(missing: list[str], extra: list[str], other_role: str) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} {other_role} tensors have no raw counterpart (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} raw tensors are not in the {other_role} (first: {extra[0]})")
    layers = (
        "; the two models have different numbers of layers" if any(".layers." in n for n in missing + extra) else ""
    )
    return "; ".join(parts) + f"{layers}. Are raw and {other_role} the same architecture and size?"


def _added_rows(
    base: TensorInfo, info: TensorInfo, other_role: str, raw: dict[str, TensorInfo], other: dict[str, TensorInfo]
) -> int:
    if base.shape == info.shape:
        return 0
    grows_vocab = (
        info.name.endswith(VOCAB_SUFFIXES)
        and len(base.shape) == len(info.shape) == 2
        and base.shape[1] == info.shape[1]
        and info.shape[0] > base.shape[0]
    )
    if grows_vocab:
        return info.shape[0] - base.shape[0]
    raise PlanError(
        f"tensor {info.name}: raw has shape {list(base.shape)}, {other_role} has {list(info.shape)}; "
        f"raw looks like {describe_size(raw)}, {other_role} like {describe_size(other)}. "
        "Give the raw model the diff was made from"
    )


def describe_size(tensors: dict[str, TensorInfo]) -> str:
    """Return a human description of a LLaMA-like checkpoint's size ("LLaMA-13B (hidden 5120, vocab 32000)")."""
    embed = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")), None)
    if embed is None or len(embed.shape) != 2:
        return "an unknown model"
    vocab, hidden = embed.shape
    name = f"LLaMA-{LLAMA_SIZES[hidden]}" if hidden in LLAMA_SIZES else "a model"
    return f"{name} (hidden {hidden}, vocab {vocab})"


def _resolve_dtype(out_dtype: str, stored: torch.dtype) -> torch.dtype:
    if out_dtype == "auto":
        return stored
    try:
        return OUT_DTYPES[out_dtype]
    except KeyError:
        raise UsageError(f"--dtype {out_dtype}: choose auto, {', '.join(OUT_DTYPES)}") from None


def plan_shards(jobs: list[TensorJob], max_bytes: int) -> tuple[ShardPlan, ...]:
    """Return shards filled in job order, each at most ``max_bytes`` unless one tensor alone is larger.

    One shard is named ``model.safetensors``; several follow Hugging Face's ``model-0000i-of-0000n`` pattern.
    """
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.out_nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.out_nbytes
    if len(groups) == 1:
        return (ShardPlan("model.safetensors", tuple(groups[0])),)
    total = len(groups)
    return tuple(
        ShardPlan(f"model-{i:05d}-of-{total:05d}.safetensors", tuple(group)) for i, group in enumerate(groups, 1)
    )
