"""Plausibility checks for a diff without a manifest: is this the base it was made against, is it a diff at all?

A manifest settles whether raw is the publisher's base. Without one (every 2023 diff), the commonest failure is a
wrong base of the right shape, which recovers silently into a broken model. Three kinds of evidence tell, all from
data a run reads anyway:

- ``config``: raw's ``config.json`` against the diff's (or the tuned model's). LLaMA-2 says max_position_embeddings
  4096 and rms_norm_eps 1e-5 where LLaMA-1 says 2048 and 1e-6; other architectures, heads or sizes differ too.
- ``precision``: a LLaMA converted with transformers >= 4.33 went through bfloat16. Stored as bfloat16 with a config
  that says float16 (that script's signature), or cast back to float16, where the low 3 of float16's 10 mantissa
  bits are then zero in every value; in a genuine float16 tensor they are zero in about 1 value in 8.
- ``grid``: a diff made from a fine-tune stored in float16 or bfloat16 (as many are) holds differences of two
  half-precision numbers: a multiple of raw's float16 step, at least one step, whose float32 mantissa ends in 12
  or more zero bits. A float32 fine-tune's diff ends so only where it moved a weight by less than 2^-12 of it,
  below float16's step. Where at least 90% of the nonzero diff ends so and most of it is not that small,
  raw + diff must land exactly on the half-precision grid: on the right base 100% of values do, on another base
  about 55-75% (measured).
- ``magnitudes``: per tensor, the diff's root mean square against raw's. A fine-tune moves weights by a few
  percent; a diff against another model, or a model given as a diff, is as large as the weights themselves.

Statistics come from an ``Evidence`` fed with rows: a sample read before the first write, then a slice of every
block the pipeline reads (on its own lane, about a millisecond per 32 MiB block). Verdicts are pure functions of it.

>>> evidence = Evidence()
>>> evidence.observe("model.norm.weight", raw_rows, diff_rows)
>>> [f.message for f in assess(evidence, raw_config, diff_config, other_role="diff")]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch

from .errors import PlausibilityError

PRECISION, CONFIG, MAGNITUDES, GRID, QUALITY = "precision", "config", "magnitudes", "grid", "quality"
PASS, WARN, REFUSE = "pass", "warn", "refuse"

SLICE_ELEMENTS = 2**14  # values of each block looked at; under torch's grain size, so no thread hand-offs
SAMPLE_ELEMENTS = 2**14  # values per tensor read up front, before the first write
ROUNDED_SHARE = 0.99  # bfloat16-rounded float16 has 100%; genuine float16 about 12.5% (measured: at most 20%)
MIN_FLOAT16_VALUES = 4096  # fewer normal float16 values than this cannot tell
COARSE_SHARE = 0.9  # a half-precision fine-tune's diff: 99-100% (measured); a float32 one's, when not tiny: <75%
DIFF_RATIO_LIMIT = 0.5  # rms(diff) / rms(raw): fine-tunes stay far below, a diff against another model is ~1.4
WHOLE_RATIO_FLOOR = 0.25  # rms(stored) / rms(raw) of a tensor a family stores whole: ~1 for a tuned tensor
QUALITY_RATIO_LIMIT = 2.0  # perplexity of the recovered model against the raw model's
FORCE_HINT = "--ignore-checks goes on anyway"
ALL_CHECKS = (CONFIG, PRECISION, GRID, MAGNITUDES)
RAW_CHECKS = (CONFIG, PRECISION)  # need no diff values: what applies to a compact diff, whose blocks are XORed bits

# The keys that say which model a config describes; a fine-tune does not change them.
_IDENTITY_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
)
_SIZES = {4096: "7B", 5120: "13B", 6656: "30B", 8192: "65B/70B"}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``pass``, ``warn`` (statistical) or ``refuse`` (certain), with a line for the user."""

    check: str
    severity: str
    message: str


@dataclass
class _TensorSums:
    raw_sq: float = 0.0
    delta_sq: float = 0.0
    values: int = 0


@dataclass
class Evidence:
    """Statistics of raw and diff (or tuned) values, fed block by block; cheap enough for every block.

    ``other_is_tuned``: in make-diff the other side is the tuned model, and the diff is ``other - raw``.
    """

    other_is_tuned: bool = False
    float16_normal: int = 0  # normal (not zero, subnormal or infinite) float16 raw values seen
    float16_low_zero: int = 0  # ... of which the low 3 mantissa bits are zero
    diff_nonzero: int = 0  # recover only: nonzero float32 diff values seen
    diff_coarse: int = 0  # ... of which the low 12 mantissa bits are zero (a difference of half-precision values)
    diff_tiny: int = 0  # ... smaller than 2^-12 of raw: below float16's step, where float32 diffs look coarse too
    result_values: int = 0  # raw + diff values seen where the diff is nonzero
    result_on_grid: dict[str, int] = field(default_factory=lambda: {"float16": 0, "bfloat16": 0})
    raw_dtype_bytes: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, _TensorSums] = field(default_factory=dict)
    whole: dict[str, _TensorSums] = field(default_factory=dict)  # tensors the family's rule takes as stored

    def observe_whole(self, name: str, raw: torch.Tensor, stored: torch.Tensor, limit: int = SLICE_ELEMENTS) -> None:
        """Add rows of a tensor the diff stores whole (the rule copies it) beside the same rows of raw."""
        wide, kept = raw.reshape(-1)[:limit].float(), stored.reshape(-1)[:limit].float()
        sums = self.whole.setdefault(name, _TensorSums())
        sums.raw_sq += float(torch.dot(wide, wide))
        sums.delta_sq += float(torch.dot(kept, kept))
        sums.values += wide.numel()

    def observe(self, name: str, raw: torch.Tensor, other: torch.Tensor, limit: int = SLICE_ELEMENTS) -> None:
        """Add the first ``limit`` values of a block of raw rows and the matching diff (or tuned) rows."""
        raw_flat = self.observe_raw(raw, limit)
        other_flat = other.reshape(-1)[: raw_flat.numel()]
        wide = raw_flat.float()
        delta = other_flat.float() - wide if self.other_is_tuned else other_flat.float()
        if not self.other_is_tuned and other_flat.dtype == torch.float32:
            self._observe_grid(wide, other_flat)
        sums = self.tensors.setdefault(name, _TensorSums())
        sums.raw_sq += float(torch.dot(wide, wide))
        sums.delta_sq += float(torch.dot(delta, delta))
        sums.values += raw_flat.numel()

    def observe_raw(self, raw: torch.Tensor, limit: int = SLICE_ELEMENTS) -> torch.Tensor:
        """Add what raw rows alone tell (their dtype and precision); return the first ``limit`` values looked at."""
        raw_flat = raw.reshape(-1)[:limit]
        dtype = str(raw.dtype).removeprefix("torch.")
        self.raw_dtype_bytes[dtype] = self.raw_dtype_bytes.get(dtype, 0) + raw.numel() * raw.element_size()
        if raw.dtype == torch.float16:
            normal, low_zero = float16_low_bits(raw_flat)
            self.float16_normal += normal
            self.float16_low_zero += low_zero
        return raw_flat

    def _observe_grid(self, raw: torch.Tensor, diff: torch.Tensor) -> None:
        nonzero = diff != 0
        self.diff_nonzero += int(nonzero.sum())
        self.diff_coarse += int((nonzero & ((diff.view(torch.int32) & 0xFFF) == 0)).sum())
        self.diff_tiny += int((nonzero & (diff.abs() < raw.abs() * 2**-12)).sum())
        result = (raw + diff)[nonzero]  # where the diff is zero, raw + diff is raw: on any grid raw is on
        self.result_values += result.numel()
        for dtype in self.result_on_grid:
            self.result_on_grid[dtype] += int((result.to(getattr(torch, dtype)).float() == result).sum())

    @property
    def raw_dtype(self) -> str | None:
        """The dtype holding most of raw's bytes seen, None before any."""
        return max(self.raw_dtype_bytes, key=self.raw_dtype_bytes.__getitem__) if self.raw_dtype_bytes else None

    def ratios(self) -> dict[str, float]:
        """Return rms(diff) / rms(raw) per tensor seen (tensors whose raw is all zero left out)."""
        return {name: math.sqrt(s.delta_sq / s.raw_sq) for name, s in self.tensors.items() if s.raw_sq > 0}


def float16_low_bits(values: torch.Tensor) -> tuple[int, int]:
    """Return (normal float16 values, those whose low 3 mantissa bits are zero): bfloat16 keeps 7 of the 10 bits.

    Zeros, subnormals and infinities are left out: a bfloat16 value need not land on float16's subnormal grid.
    """
    bits = values.view(torch.int16)
    exponent = bits & 0x7C00
    normal = (exponent != 0) & (exponent != 0x7C00)
    low_zero = normal & ((bits & 7) == 0)
    return int(normal.sum()), int(low_zero.sum())


def sample_rows(
    jobs: Iterable, raw, other, limit: int = SAMPLE_ELEMENTS
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yield (name, raw rows, other rows) from the middle of each job's tensor, about ``limit`` values each.

    ``raw`` and ``other`` are opened checkpoints (anything with ``read_rows``; ``other`` None: raw rows only);
    rows come from the middle, away from special tokens in the vocabulary tensors, and never from rows the other
    side added.
    """
    for job in jobs:
        if not job.raw_rows:  # no raw counterpart, or stored absolute: nothing is added to raw
            continue
        rows = max(1, min(job.raw_rows, limit // max(1, job.raw.row_numel)))
        start = (job.raw_rows - rows) // 2
        other_rows = other.read_rows(job.other, start, start + rows) if other is not None else None
        yield job.name, raw.read_rows(job.raw, start, start + rows), other_rows


def sample_whole(
    jobs: Iterable, raw, other, limit: int = SAMPLE_ELEMENTS
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield (name, raw rows, stored rows) from the middle of raw's rows of each matrix the rule takes as stored
    whole, where raw has it too: a tuned tensor stored whole is about as large as raw's, a difference is not."""
    for job in jobs:
        if not getattr(job, "absolute", False) or job.raw is None or len(job.raw.shape) < 2:
            continue
        if job.raw.shape[1:] != job.other.shape[1:] or job.other.rows < job.raw.rows:
            continue  # stored whole because raw's is of another width: nothing to hold it against
        rows = max(1, min(job.raw.rows, limit // max(1, job.raw.row_numel)))
        start = (job.raw.rows - rows) // 2  # raw's rows, from the middle: away from special tokens
        yield job.name, raw.read_rows(job.raw, start, start + rows), other.read_rows(job.other, start, start + rows)


def describe_config(config: dict) -> str:
    """Return a short name for the model a config describes ("LLaMA-1 13B"), or its identity in numbers."""
    body = _identity(config)
    size = _SIZES.get(body["hidden_size"], "")
    if body["model_type"] == "llama" and body["rope_theta"] == 10000.0:
        generation = {2048: "LLaMA-1", 4096: "LLaMA-2"}.get(body["max_position_embeddings"])
        if generation and size:
            return f"{generation} {size}"
    if body["model_type"] == "llama" and body["rope_theta"] == 500000.0:
        return "LLaMA-3" + (" 8B" if body["hidden_size"] == 4096 else " 70B" if body["hidden_size"] == 8192 else "")
    return (
        f"{body['model_type'] or 'a model'} (hidden {body['hidden_size']}, {body['num_hidden_layers']} layers, "
        f"max_position_embeddings {body['max_position_embeddings']}, rms_norm_eps {body['rms_norm_eps']})"
    )


def _identity(config: dict) -> dict:
    """Return the identity keys with the defaults old configs leave out, so 2023 and 2026 configs compare."""
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    rope = config.get("rope_parameters") or {}
    body = {
        "model_type": config.get("model_type"),
        "architectures": [a.lower() for a in config.get("architectures") or []] or None,
        "hidden_size": hidden,
        "intermediate_size": config.get("intermediate_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or (hidden // heads if hidden and heads else None),
        "hidden_act": config.get("hidden_act", "silu"),
        "rms_norm_eps": config.get("rms_norm_eps"),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    return body


def config_finding(raw_config: dict, other_config: dict, *, other_role: str) -> Finding:
    """Return whether raw's config describes the model the diff (or tuned model) was made from.

    A key both configs state and that differs is certain evidence, with one exception: a longer context with
    ``rope_scaling`` in the other's config is a fine-tune that extended it (a warning).
    """
    if not raw_config:
        return Finding(CONFIG, PASS, "config: raw has no config.json to compare")
    raw_id, other_id = _identity(raw_config), _identity(other_config)
    differing = [
        key
        for key in _IDENTITY_KEYS
        if raw_id[key] is not None and other_id[key] is not None and raw_id[key] != other_id[key]
    ]
    if not differing:
        return Finding(
            CONFIG,
            PASS,
            f"config: raw's config.json describes {describe_config(raw_config)}, as the {other_role}'s does",
        )
    said = ", ".join(f"{key} {raw_id[key]}" for key in differing)
    other_said = ", ".join(f"{key} {other_id[key]}" for key in differing)
    message = (
        f"config: raw's config.json says {said}; the {other_role}'s says {other_said}: raw looks like "
        f"{describe_config(raw_config)}, the {other_role} was made from {describe_config(other_config)}"
    )
    if differing == ["max_position_embeddings"] and other_config.get("rope_scaling"):
        return Finding(CONFIG, WARN, message + " with its context extended (rope_scaling); if that is so, go on")
    return Finding(CONFIG, REFUSE, message + f". Give the base the {other_role} names in its README; {FORCE_HINT}")


def precision_finding(evidence: Evidence, raw_config: dict, *, other_role: str) -> Finding:
    """Return whether raw's weights went through bfloat16 (transformers >= 4.33's LLaMA conversion does that)."""
    stated = raw_config.get("torch_dtype") or raw_config.get("dtype")
    if evidence.raw_dtype == "bfloat16":
        if stated == "float16":
            return Finding(
                PRECISION,
                REFUSE,
                "precision: raw's weights are bfloat16 while its config.json says float16, the signature of "
                "transformers >= 4.33's convert_llama_weights_to_hf.py, which rounds every LLaMA weight through "
                "bfloat16 (87% of LLaMA-1's values change); the 2023 diffs were made against float16 conversions. "
                f"Convert Meta's checkpoint with transformers <= 4.32; {FORCE_HINT}",
            )
        return Finding(
            PRECISION,
            WARN,
            f"precision: raw's weights are bfloat16; if the {other_role} was made against a float16 base (every "
            "2023 LLaMA diff was), the result is off by bfloat16's rounding. Use a float16 conversion if there is one",
        )
    normal, low_zero = evidence.float16_normal, evidence.float16_low_zero
    if normal < MIN_FLOAT16_VALUES:
        said = (
            f"only {normal} normal float16 values seen, too few to tell"
            if evidence.raw_dtype == "float16"
            else f"raw is {evidence.raw_dtype or 'unknown'}, not float16: no bfloat16 signature to look for"
        )
        return Finding(PRECISION, PASS, f"precision: {said}")
    share = low_zero / normal
    counted = f"{share:.1%} of {normal:,} float16 values have their low 3 mantissa bits zero"
    if share >= ROUNDED_SHARE:
        return Finding(
            PRECISION,
            REFUSE,
            f"precision: {counted} (genuine float16: about 12.5%): raw went through bfloat16, as transformers "
            ">= 4.33's convert_llama_weights_to_hf.py does, and was cast back to float16; the 2023 diffs were made "
            f"against genuine float16. Convert Meta's checkpoint with transformers <= 4.32; {FORCE_HINT}",
        )
    return Finding(PRECISION, PASS, f"precision: genuine float16 ({counted}, as expected; bfloat16-rounded: 100%)")


def grid_finding(evidence: Evidence, *, other_role: str) -> Finding:
    """Return whether raw + diff lands on the half-precision grid that a diff of half-precision models implies."""
    if evidence.other_is_tuned:
        return Finding(GRID, PASS, "grid: applies to recover only")
    nonzero = evidence.diff_nonzero
    if nonzero >= MIN_FLOAT16_VALUES and evidence.diff_tiny / nonzero >= 0.5:
        return Finding(
            GRID,
            PASS,
            f"grid: the {other_role} changes most weights by less than float16's step, as "
            "only a float32 fine-tune can: no grid to land on; this check cannot tell",
        )
    if nonzero < MIN_FLOAT16_VALUES or evidence.diff_coarse / nonzero < COARSE_SHARE:
        share = f"{evidence.diff_coarse / nonzero:.1%}" if nonzero else "none"
        return Finding(
            GRID,
            PASS,
            f"grid: the {other_role} was made from a float32 fine-tune ({share} of its values "
            "have 12 zero low bits), so no grid to land on; this check cannot tell",
        )
    grid, landed = max(evidence.result_on_grid.items(), key=lambda item: item[1])
    share = landed / evidence.result_values
    counted = f"{share:.1%} of {evidence.result_values:,} values of raw + {other_role} are exact {grid}"
    if share >= ROUNDED_SHARE:
        return Finding(
            GRID,
            PASS,
            f"grid: {counted}, as a fine-tune stored in half precision is: raw is the "
            "base the diff was made against, bit for bit",
        )
    return Finding(
        GRID,
        REFUSE,
        f"grid: the {other_role} holds differences of half-precision models ({evidence.diff_coarse / nonzero:.1%} of "
        f"its values have 12 zero low bits), so raw + {other_role} must land on the float16 or bfloat16 grid; only "
        f"{counted}: raw is not the base the {other_role} was made against (another model, conversion or precision). "
        f"Give the base its README names; {FORCE_HINT}",
    )


def magnitude_finding(evidence: Evidence, *, other_role: str) -> Finding:
    """Return whether the diff's values are as small against raw's as a fine-tune's, tensor by tensor, and those
    the rule takes as stored whole as large."""
    small = {
        name: math.sqrt(s.delta_sq / s.raw_sq)
        for name, s in evidence.whole.items()
        if s.raw_sq > 0 and s.delta_sq < WHOLE_RATIO_FLOOR**2 * s.raw_sq
    }
    if small:
        name = min(small, key=small.__getitem__)
        return Finding(
            MAGNITUDES,
            REFUSE,
            f"magnitudes: the rule applied takes {name} as stored whole, but the {other_role}'s {name} is "
            f"{small[name]:.1%} of raw's rms: a difference, not a tuned tensor, so the {other_role} does not follow "
            f"that family's rule. Give the family its README names with --family (or omit a wrong one); {FORCE_HINT}",
        )
    ratios = evidence.ratios()
    if not ratios:
        return Finding(MAGNITUDES, PASS, "magnitudes: no tensor to compare")
    worst = max(ratios, key=ratios.__getitem__)
    large = sorted((name for name, r in ratios.items() if r > DIFF_RATIO_LIMIT), key=ratios.__getitem__, reverse=True)
    what = "tuned - raw" if evidence.other_is_tuned else "the diff"
    if not large:
        return Finding(
            MAGNITUDES,
            PASS,
            f"magnitudes: {what} is small against raw, as after fine-tuning (at most "
            f"{ratios[worst]:.1%} of raw's rms, in {worst})",
        )
    named = ", ".join(f"{name} {ratios[name]:.2f}" for name in large[:3])
    cause = (
        "the tuned model is not a fine-tune of this raw model"
        if evidence.other_is_tuned
        else f"the {other_role} was not made against a model like this raw one, or is not a diff"
    )
    return Finding(
        MAGNITUDES,
        WARN,
        f"magnitudes: in {len(large)} of {len(ratios)} tensors {what} is as large as raw's weights (rms ratio "
        f"{named}; a fine-tune stays far below {DIFF_RATIO_LIMIT}): {cause}",
    )


def assess(
    evidence: Evidence, raw_config: dict, other_config: dict, *, other_role: str, checks: Iterable[str] = ALL_CHECKS
) -> list[Finding]:
    """Return each of ``checks``' finding for what has been seen so far."""
    finding = {
        CONFIG: lambda: config_finding(raw_config, other_config, other_role=other_role),
        PRECISION: lambda: precision_finding(evidence, raw_config, other_role=other_role),
        GRID: lambda: grid_finding(evidence, other_role=other_role),
        MAGNITUDES: lambda: magnitude_finding(evidence, other_role=other_role),
    }
    return [finding[check]() for check in checks]


def quality_finding(raw_perplexity: float, tuned_perplexity: float, vocab_size: int, tokens: int) -> Finding:
    """Return the verdict on perplexities: a right base stays close to raw's, a wrong one explodes."""
    said = f"perplexity {tuned_perplexity:.2f} against raw's {raw_perplexity:.2f} on {tokens} tokens of English"
    if raw_perplexity > vocab_size / 4:
        return Finding(
            QUALITY, WARN, f"quality: {said}; raw's is near chance ({vocab_size} tokens): raw is not a trained model"
        )
    if not math.isfinite(tuned_perplexity) or tuned_perplexity > QUALITY_RATIO_LIMIT * raw_perplexity:
        return Finding(
            QUALITY,
            WARN,
            f"quality: {said}: the recovered model is broken; the base is not the one the "
            "diff was made against (or the diff is damaged)",
        )
    return Finding(QUALITY, PASS, f"quality: {said}: close to the base, as a correct recovery is")


class Plausibility:
    """One run's checks: assessed on a sample read before the first write, then on every block the run reads.

    Certain evidence refuses the run (``PlausibilityError``) unless ``ignore``; with a manifest, which settles
    the question tensor by tensor, nothing is refused here. ``checks``: the ones that apply (``RAW_CHECKS`` when
    the other side's values are no differences).
    """

    def __init__(
        self,
        raw_config: dict,
        other_config: dict,
        *,
        other_role: str,
        has_manifest: bool,
        ignore: bool,
        checks: tuple[str, ...] = ALL_CHECKS,
    ) -> None:
        self.raw_config, self.other_config, self.other_role = raw_config, other_config, other_role
        self.checks = checks
        self.may_refuse = not (has_manifest or ignore)
        self.evidence = Evidence(other_is_tuned=other_role != "diff")

    def before_writing(self, jobs: Iterable, raw, other) -> list[Finding]:
        """Return the findings on a sample of every tensor's rows (``other`` None: raw's only); raise on certain
        evidence."""
        jobs = list(jobs)
        for name, raw_rows, other_rows in sample_rows(jobs, raw, other):
            if other_rows is None:
                self.evidence.observe_raw(raw_rows)
            else:
                self.evidence.observe(name, raw_rows, other_rows)
        if other is not None and MAGNITUDES in self.checks and not self.evidence.other_is_tuned:
            for name, raw_rows, stored_rows in sample_whole(jobs, raw, other):
                self.evidence.observe_whole(name, raw_rows, stored_rows)
        findings = self._assess()
        refused = [f for f in findings if f.severity == REFUSE]
        if refused and self.may_refuse:
            raise PlausibilityError(f"refused: {refused[0].message}")
        return findings

    def observe(self, name: str, raw_rows: torch.Tensor, other_rows: torch.Tensor) -> None:
        """The pipeline's hook: a slice of every block of raw rows, with the diff's (or tuned) rows."""
        self.evidence.observe(name, raw_rows, other_rows)

    def at_end(self) -> list[Finding]:
        """Return the findings on everything seen; nothing is refused once written (warnings only)."""
        return [replace(f, severity=WARN) if f.severity == REFUSE else f for f in self._assess()]

    def _assess(self) -> list[Finding]:
        return assess(self.evidence, self.raw_config, self.other_config, other_role=self.other_role, checks=self.checks)


def final_line(*, verified: bool, findings: Iterable[Finding], tensors: int) -> str:
    """Return the run's last line: verified by the manifest, plausible on every check, or a warning."""
    findings = list(findings)
    if verified:
        return f"verified: {tensors} tensors match the publisher's manifest"
    failed = [f.check for f in findings if f.severity != PASS]
    if failed:
        return (
            f"warning: not verified (the diff has no manifest) and {len(failed)} plausibility check"
            f"{'s' if len(failed) != 1 else ''} failed ({', '.join(failed)}; see above): the model may be broken"
        )
    if not findings:
        return "not verified: the diff has no manifest, so the result could not be checked against the publisher"
    passed = ", ".join(f.check for f in findings)
    return f"not verified: the diff has no manifest, but every plausibility check passed: {passed}" + (
        "" if any(f.check == QUALITY for f in findings) else "; --check-quality also measures perplexity"
    )
