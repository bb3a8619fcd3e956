"""The published LLaMA diff families: how each publisher's own script recovers its diff, as data.

Every 2023 diff was recovered by its publisher's script, and each script has its own arithmetic. The planner reads
one ``Family`` and applies it; nothing else in the pipeline knows family names. Adding a family is adding one entry
to ``FAMILIES`` (and its tests).

What each script does (read from the scripts themselves; transformers 4.28-era loading):

- open-instruct / Tulu v1 (``weight_diff.py``), Stanford Alpaca / WizardLM (``weight_diff.py``): raw and diff
  loaded in float32, raw's vocabulary grown by the rows the diff has beyond it, set to ``rows.mean(dim=0)``
  computed by torch in float32 (``smart_tokenizer_and_embedding_resize``); ``diff += raw``. Alpaca then asserts
  the float32 sum of every state-dict tensor (rotary ``inv_freq`` included) is within 1e-2 of 50637.1836.
- Vicuna v0 / StableVicuna (FastChat <= 0.1.10 ``apply_delta.py``): both loaded in float16, raw grown by the
  added rows set to 0, ``raw += delta`` in float16. Vicuna v1.1 (FastChat >= 0.2): the same without growing.
- LLaVA v0 (``llava/model/apply_delta.py``): float16; where shapes differ (embed_tokens, lm_head) raw is added
  to the top-left block only, the delta's extra rows stay as stored; ``mm_projector`` has no raw counterpart and
  is kept as stored.
- AlpacaFarm (``recover_model_weights.py``): float32, raw grown with the float32 mean (``stable_resize...``);
  a tensor whose size still differs from raw's is stored absolute; ``model_sum.txt`` holds the expected sum,
  compared with ``np.isclose`` (relative 1e-5).
- Ziya (Fengshenbang ``apply_delta.py``): float16; ``embed_tokens``, ``lm_head`` (and rotary buffers) are
  stored absolute in the delta and taken as they are; every other tensor is added in float16.
- OpenAssistant (``xor_codec.py``): every file XORed byte for byte with raw's file of the same name; BELLE
  (``decrypt.py``): every file XORed with Meta's ``consolidated.00.pth``; see ``xor``.

>>> family, reason = detect(evidence_of(diff, raw))
>>> family.name, reason
('vicuna-v1.1', 'float16 delta, same vocabulary as raw: FastChat >= 0.2 apply_delta (float16 add)')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import UsageError
from .files import read_json_object
from .manifest import MANIFEST_NAME

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB_TENSORS = (EMBED, LM_HEAD)
LLAMA_VOCAB = 32000  # every LLaMA-1 checkpoint's vocabulary: the raw side when only the diff is at hand
ALPACA_7B_SUM = 50637.1836  # hard-coded in stanford_alpaca weight_diff.py
ALPACA_SUM_ATOL = 1e-2
MODEL_SUM_FILE = "model_sum.txt"  # AlpacaFarm's expected sum, one float
MODEL_SUM_RTOL, MODEL_SUM_ATOL = 1e-5, 1e-8  # numpy.isclose defaults, as AlpacaFarm calls it


@dataclass(frozen=True)
class Evidence:
    """What the diff shows about who made it: files, dtypes, shapes and the tokenizer's pad token."""

    files: frozenset[str]
    dtype: torch.dtype  # the dtype holding most of the diff's parameters
    added_rows: int | None  # diff embed rows minus raw's (raw's known, or LLaMA's 32000); None without embed
    pad_token: str | None  # as the diff's tokenizer files name it
    unpaired: tuple[str, ...]  # diff tensors the raw model lacks (only when the raw model is at hand)

    @property
    def has(self) -> Callable[[str], bool]:
        return self.files.__contains__

    @property
    def projector(self) -> tuple[str, ...]:
        """LLaVA's multimodal projector tensors, which no language model has."""
        return tuple(name for name in self.unpaired if "mm_projector" in name)


@dataclass(frozen=True)
class SumCheck:
    """A family's integrity sum: float32 sum of every state-dict tensor of the result, inv_freq included."""

    source: str  # "alpaca" (hard-coded 7B value) or "model_sum.txt"
    atol: float
    rtol: float


@dataclass(frozen=True)
class Family:
    """How one publisher's script recovers its diff.

    ``arithmetic``: dtype both sides are cast to before adding (as ``from_pretrained(torch_dtype=...)`` did).
    ``added_rows``: how raw's missing vocabulary rows are filled before adding: "mean" (float64-exact mean, ours),
    "torch-mean" (torch's float32 ``mean(dim=0)``), "zero", "stored" (the diff's rows are absolute), or None (a
    diff with more rows is refused). ``absolute``: tensors stored as they are, never added.
    ``resized_absolute``: any other tensor whose shape differs from raw's is stored absolute (AlpacaFarm).
    ``unpaired``: diff-only tensors kept as stored (regex); others are refused.
    """

    name: str
    title: str
    script: str
    arithmetic: torch.dtype
    added_rows: str | None
    matches: Callable[[Evidence], str | None]  # the reason this diff looks like the family's, or None
    absolute: tuple[str, ...] = ()
    resized_absolute: bool = False
    unpaired: str | None = None
    sum_check: SumCheck | None = None
    makes_diff: bool = False  # make-diff --family can make a diff the way this publisher did
    xor_codec: str | None = None  # the diff is files XORed with raw's bytes by this codec (see xor.py), not tensors

    def is_absolute(self, name: str) -> bool:
        return name in self.absolute

    def keeps_unpaired(self, name: str) -> bool:
        return self.unpaired is not None and re.fullmatch(self.unpaired, name) is not None


def _ours(e: Evidence) -> str | None:
    return f"has {MANIFEST_NAME}" if e.has(MANIFEST_NAME) else None


def _fp32_pad(pad: str | None) -> Callable[[Evidence], str | None]:
    def matches(e: Evidence) -> str | None:
        if e.has(MANIFEST_NAME) or e.has(MODEL_SUM_FILE) or e.dtype != torch.float32 or e.projector:
            return None
        if e.added_rows == 0 and pad == "<pad>":
            return "float32 diff with raw's vocabulary: plain float32 addition (open-instruct rule)"
        if e.added_rows and e.added_rows > 0 and e.pad_token in (pad, None):
            return f"float32 diff, {e.added_rows} added vocabulary row(s), pad token {e.pad_token or 'unnamed'}"
        return None

    return matches


def _alpaca_farm(e: Evidence) -> str | None:
    return f"ships {MODEL_SUM_FILE}" if e.has(MODEL_SUM_FILE) and not e.has(MANIFEST_NAME) else None


def _fp16(rows: Callable[[int], bool], what: str) -> Callable[[Evidence], str | None]:
    def matches(e: Evidence) -> str | None:
        if e.has(MANIFEST_NAME) or e.dtype != torch.float16 or e.projector or e.added_rows is None:
            return None
        return f"float16 delta, {what}" if rows(e.added_rows) else None

    return matches


def _llava(e: Evidence) -> str | None:
    if e.projector and e.dtype == torch.float16:
        return f"float16 delta with {', '.join(e.projector)} (no raw counterpart)"
    return None


FAMILIES: tuple[Family, ...] = (
    Family(
        name="weight-diff",
        title="weight-diff (this tool's diffs)",
        script="weight-diff make-diff",
        arithmetic=torch.float32,
        added_rows="mean",
        matches=_ours,
        makes_diff=True,
    ),
    Family(
        name="open-instruct",
        title="open-instruct / Tulu v1",
        script="open-instruct weight_diff.py",
        arithmetic=torch.float32,
        added_rows="torch-mean",
        matches=_fp32_pad("<pad>"),
    ),
    Family(
        name="alpaca",
        title="Stanford Alpaca",
        script="stanford_alpaca weight_diff.py",
        arithmetic=torch.float32,
        added_rows="torch-mean",
        matches=_fp32_pad("[PAD]"),
        sum_check=SumCheck("alpaca", atol=ALPACA_SUM_ATOL, rtol=0.0),
        makes_diff=True,
    ),
    Family(
        name="wizardlm",
        title="WizardLM (Alpaca's script, without Alpaca's sum)",
        script="stanford_alpaca weight_diff.py",
        arithmetic=torch.float32,
        added_rows="torch-mean",
        matches=lambda e: None,  # indistinguishable from Alpaca's files: chosen with --family
        makes_diff=True,
    ),
    Family(
        name="alpaca-farm",
        title="AlpacaFarm",
        script="alpaca_farm pretrained_models/recover_model_weights.py",
        arithmetic=torch.float32,
        added_rows="torch-mean",
        matches=_alpaca_farm,
        resized_absolute=True,
        unpaired=r".*",
        sum_check=SumCheck(MODEL_SUM_FILE, atol=MODEL_SUM_ATOL, rtol=MODEL_SUM_RTOL),
    ),
    Family(
        name="vicuna-v0",
        title="Vicuna v0 / StableVicuna",
        script="FastChat <= 0.1.10 apply_delta.py",
        arithmetic=torch.float16,
        added_rows="zero",
        matches=_fp16(lambda rows: 1 <= rows <= 8, "a few added vocabulary rows (FastChat <= 0.1.10: zero rows)"),
        makes_diff=True,
    ),
    Family(
        name="vicuna-v1.1",
        title="Vicuna v1.1",
        script="FastChat >= 0.2 apply_delta.py",
        arithmetic=torch.float16,
        added_rows=None,
        matches=_fp16(lambda rows: rows == 0, "same vocabulary as raw (FastChat >= 0.2: float16 add)"),
        makes_diff=True,
    ),
    Family(
        name="llava-v0",
        title="LLaVA v0",
        script="LLaVA llava/model/apply_delta.py",
        arithmetic=torch.float16,
        added_rows="stored",
        matches=_llava,
        unpaired=r"model\.mm_projector\.(weight|bias)",
    ),
    Family(
        name="ziya",
        title="Ziya-LLaMA",
        script="Fengshenbang fengshen/utils/apply_delta.py",
        arithmetic=torch.float16,
        added_rows="stored",
        matches=_fp16(lambda rows: rows > 8, "a much larger vocabulary; embeddings and lm_head stored absolute"),
        absolute=VOCAB_TENSORS,
    ),
    Family(
        name="openassistant-xor",
        title="OpenAssistant XOR",
        script="Open-Assistant model/model_training/tools/xor_codec.py",
        arithmetic=torch.uint8,
        added_rows=None,
        matches=lambda e: None,  # its weights cannot be read as tensors: xor.detect_files tells it from its files
        xor_codec="same-name",
    ),
    Family(
        name="belle",
        title="BELLE (XOR with Meta's consolidated.00.pth)",
        script="BELLE models/decrypt.py",
        arithmetic=torch.uint8,
        added_rows=None,
        matches=lambda e: None,
        xor_codec="belle",
    ),
)
BY_NAME = {family.name: family for family in FAMILIES}


def family_named(name: str) -> Family:
    """Return the family called ``name`` (``--family``), refusing unknown names with the list."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise UsageError(f"--family {name}: unknown; choose one of {', '.join(BY_NAME)}") from None


def detect(evidence: Evidence) -> tuple[Family, str]:
    """Return the one family whose signature the diff shows, and why; refuse none or several."""
    found = [(family, reason) for family in FAMILIES if (reason := family.matches(evidence))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(
            f"no known diff family matches this diff ({_describe(evidence)}); if you know who published it, "
            f"choose with --family ({', '.join(BY_NAME)})"
        )
    names = ", ".join(f"{family.name} ({reason})" for family, reason in found)
    raise UsageError(f"this diff fits several families: {names}; choose one with --family NAME")


def _describe(e: Evidence) -> str:
    rows = "unknown vocabulary" if e.added_rows is None else f"{e.added_rows:+d} vocabulary rows against raw"
    extra = f", {len(e.unpaired)} tensors without raw counterpart" if e.unpaired else ""
    return f"{str(e.dtype).removeprefix('torch.')}, {rows}, pad token {e.pad_token or 'none'}{extra}"


def evidence_of(diff: Checkpoint, raw: Checkpoint | None = None) -> Evidence:
    """Return what the diff directory shows (with the raw model, when given, for shapes and unpaired tensors)."""
    by_dtype: dict[torch.dtype, int] = {}
    for info in diff.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.numel
    embed = diff.tensors.get(EMBED)
    raw_rows = LLAMA_VOCAB
    if raw is not None and EMBED in raw.tensors:
        raw_rows = raw.tensors[EMBED].rows
    unpaired = tuple(sorted(set(diff.tensors) - set(raw.tensors))) if raw is not None else ()
    if raw is None:  # without raw, LLaVA's projector is the one diff-only tensor we can name
        unpaired = tuple(name for name in diff.tensors if "mm_projector" in name)
    return Evidence(
        files=frozenset(path.name for path in diff.directory.iterdir()),
        dtype=max(by_dtype, key=by_dtype.__getitem__),
        # Without raw, a vocabulary below LLaMA's says nothing about rows added to it (not "-31679 rows").
        added_rows=embed.rows - raw_rows if embed is not None and (raw is not None or embed.rows >= raw_rows) else None,
        pad_token=pad_token(diff.directory),
        unpaired=unpaired,
    )


def pad_token(directory: Path) -> str | None:
    """Return the pad token the tokenizer files name (``added_tokens.json``, then ``special_tokens_map.json``)."""
    for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        body = read_json_object(directory / name)
        if name == "added_tokens.json":
            for token in body:
                if "pad" in token.lower():
                    return token
            continue
        pad = body.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and pad:
            return pad
    return None


def expected_sum(family: Family, diff_dir: Path) -> float | None:
    """Return the sum the family's publisher expects, None when the family has no sum check."""
    check = family.sum_check
    if check is None:
        return None
    if check.source == "alpaca":
        return ALPACA_7B_SUM
    path = diff_dir / MODEL_SUM_FILE
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); AlpacaFarm's integrity sum needs it") from None


def inv_freq_sums(config: dict, dtype: torch.dtype) -> list[float]:
    """Return each layer's sum of the rotary ``inv_freq`` buffer the 2023 conversions saved, in ``dtype``.

    transformers < 4.32 kept these buffers in the state dict, so the publishers' sums include them; they follow
    from the config: ``1 / theta ** (arange(0, head_dim, 2) / head_dim)``, stored in the checkpoint's dtype.
    """
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    layers = config.get("num_hidden_layers")
    if not (heads and hidden and layers):
        raise UsageError("config.json lacks hidden_size, num_attention_heads or num_hidden_layers: cannot sum")
    head_dim = config.get("head_dim") or hidden // heads
    theta = float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    stored = inv_freq.to(dtype).to(torch.float32)
    return [stored.sum().item()] * int(layers)


# The order of a 2023 LlamaForCausalLM state dict, which the publishers' float32 running sums followed.
_LAYER_ORDER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.rotary_emb.inv_freq",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
    "mlp.up_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _state_dict_position(name: str) -> tuple:
    if name == EMBED:
        return (0,)
    match = _LAYER.fullmatch(name)
    if match:
        part = match.group(2)
        index = _LAYER_ORDER.index(part) if part in _LAYER_ORDER else len(_LAYER_ORDER)
        return (1, int(match.group(1)), index, part)
    return (2, name != "model.norm.weight", name)


def publisher_sum(tensor_sums: dict[str, float], inv_freq: list[float]) -> float:
    """Return the float32 running sum the 2023 scripts computed: tensor sums in state-dict order, inv_freq included.

    Each tensor's sum is rounded to float32 (torch's ``tensor.sum()``), then added in float32 as Python's
    ``sum`` over 0-d float32 tensors did.
    """
    parts = dict(tensor_sums)
    for layer, value in enumerate(inv_freq):
        parts[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = value
    total = torch.zeros((), dtype=torch.float32)
    for name in sorted(parts, key=_state_dict_position):
        total += torch.tensor(parts[name], dtype=torch.float32)
    return total.item()


def sum_passes(check: SumCheck, expected: float, got: float) -> bool:
    """Return whether ``got`` passes as the publisher's script tests it (``allclose`` / ``np.isclose``)."""
    return abs(got - expected) <= check.atol + check.rtol * abs(expected)
