"""Perplexity of a LLaMA-style model on a short English text, streamed one weight tensor at a time.

A recovery onto the wrong base has the right shapes and passes every cheap check that looks at numbers alone, but
it is a broken model: its perplexity explodes, while a correct recovery stays close to the base's. This measures
both, in flat memory: the hidden states of the text (a few hundred tokens) stay in RAM, and the weights are read
from disk one tensor at a time, widened to float32, used and dropped; ``lm_head`` is read in blocks of rows. The
largest resident weight is one MLP matrix (283 MB in float32 at 13B), never a layer or the model.

>>> report = check_quality("llama-13b-hf", "self-instruct-13b")
>>> report.finding.message
'quality: perplexity 7.41 against raw's 6.98 on 212 tokens of English: close to the base, as a correct recovery is'
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import files
from .checkpoint import Checkpoint, TensorInfo
from .checks import Finding, quality_finding
from .errors import WeightDiffError

# Plain, general English: an instruction-tuned model and its base both predict it well.
QUALITY_TEXT = (
    "The river runs through the middle of the old town, and most of its streets lead down to the water. In the "
    "morning the market opens on the square by the bridge, where farmers sell bread, cheese, apples and flowers. "
    "Children walk to school along the bank, and their parents stop for a cup of coffee before going to work. "
    "In the afternoon the town is quiet. Shops close for an hour, and people rest in the shade of the trees. "
    "When the sun goes down, families come out again to walk by the river and talk with their neighbours. "
    "Visitors often say that life here is slow, but the people who live in the town would not change it. "
    "They know every path in the hills around it, the names of the birds that nest in the old walls, and the "
    "best place to watch the stars on a clear summer night."
)
LM_HEAD_ROWS = 4096  # rows of lm_head widened at a time (80 MB of float32 at 13B)


class QualityError(WeightDiffError):
    """The model cannot be run by this layer-streamed forward (architecture, missing tensor, no tokenizer)."""


@dataclass(frozen=True)
class QualityReport:
    """Perplexities of the raw and the recovered model on the same tokens, and the verdict on them."""

    raw_perplexity: float
    tuned_perplexity: float
    tokens: int
    seconds: float
    finding: Finding


def check_quality(raw_dir: str | Path, tuned_dir: str | Path, text: str = QUALITY_TEXT) -> QualityReport:
    """Return the perplexities of the raw and recovered models on ``text``, tokenized by the recovered model."""
    started = time.monotonic()
    token_ids = tokenize(tuned_dir, text)
    raw_ppl = perplexity(raw_dir, token_ids)
    tuned_ppl = perplexity(tuned_dir, token_ids)
    vocab = int(files.read_config(Path(raw_dir)).get("vocab_size") or 32000)
    finding = quality_finding(raw_ppl, tuned_ppl, vocab, len(token_ids))
    return QualityReport(raw_ppl, tuned_ppl, len(token_ids), time.monotonic() - started, finding)


def tokenize(model_dir: str | Path, text: str) -> list[int]:
    """Return the token ids of ``text`` (with BOS) by the model's own tokenizer."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # many causes (sentencepiece, protobuf, a broken file): all mean "cannot tokenize"
        raise QualityError(
            f"{model_dir}: its tokenizer does not load ({type(exc).__name__}: {exc}); the quality check needs it"
        ) from None
    return list(tokenizer(text)["input_ids"])


def perplexity(model_dir: str | Path, token_ids: list[int]) -> float:
    """Return exp(mean negative log-likelihood) of each next token of ``token_ids`` under the model."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    model_dir = Path(model_dir)
    config = files.read_config(model_dir)
    with Checkpoint.open(model_dir) as checkpoint:
        weights = _Weights(checkpoint)
        hidden = _embed(weights, token_ids)
        cos, sin = _rotary(config, len(token_ids))
        for layer in range(int(config["num_hidden_layers"])):
            hidden = _decoder_layer(weights, config, layer, hidden, cos, sin)
        hidden = _rms_norm(hidden, weights.get("model.norm.weight"), config)
        head = "lm_head.weight" if "lm_head.weight" in checkpoint.tensors else "model.embed_tokens.weight"
        nll = _next_token_nll(weights, checkpoint.tensors[head], hidden[:-1], torch.tensor(token_ids[1:]))
    return math.exp(nll)


class _Weights:
    """One tensor at a time from a checkpoint, widened to float32."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def info(self, name: str) -> TensorInfo:
        try:
            return self.checkpoint.tensors[name]
        except KeyError:
            raise QualityError(
                f"{self.checkpoint.directory}: no tensor {name}; the quality check runs LLaMA-style models only"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.checkpoint.read_rows(info, 0, info.rows).float()

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.checkpoint.tensors else None

    def rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read_rows(info, start, stop).float()


def _embed(weights: _Weights, token_ids: list[int]) -> torch.Tensor:
    """Return the embedding rows of the tokens, reading only those rows."""
    info = weights.info("model.embed_tokens.weight")
    rows = {i: weights.rows(info, i, i + 1)[0] for i in sorted(set(token_ids))}
    return torch.stack([rows[i] for i in token_ids])


def _rotary(config: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return LLaMA's rotary cos and sin for positions 0..length-1 (Hugging Face's half-split layout)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "linear"):
        raise QualityError(f"rope scaling {kind!r} is not supported by the quality check")
    positions = torch.arange(length, dtype=torch.float32)
    if kind == "linear":
        positions = positions / float(scaling["factor"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
    eps = float(config.get("rms_norm_eps", 1e-6))
    return weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps))


def _linear(weights: _Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weights.get(f"{name}.weight"), weights.maybe(f"{name}.bias"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _decoder_layer(
    weights: _Weights, config: dict, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Return the hidden states after decoder layer ``layer``, its weights read one at a time."""
    if config.get("hidden_act", "silu") != "silu":
        raise QualityError(f"activation {config['hidden_act']!r} is not supported by the quality check (LLaMA: silu)")
    prefix = f"model.layers.{layer}"
    tokens = hidden.shape[0]
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)

    x = _rms_norm(hidden, weights.get(f"{prefix}.input_layernorm.weight"), config)
    q = _linear(weights, f"{prefix}.self_attn.q_proj", x).view(tokens, heads, head_dim).transpose(0, 1)
    k = _linear(weights, f"{prefix}.self_attn.k_proj", x).view(tokens, kv_heads, head_dim).transpose(0, 1)
    v = _linear(weights, f"{prefix}.self_attn.v_proj", x).view(tokens, kv_heads, head_dim).transpose(0, 1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(tokens, -1)
    hidden = hidden + _linear(weights, f"{prefix}.self_attn.o_proj", attended)

    x = _rms_norm(hidden, weights.get(f"{prefix}.post_attention_layernorm.weight"), config)
    gate = F.silu(_linear(weights, f"{prefix}.mlp.gate_proj", x))
    gate *= _linear(weights, f"{prefix}.mlp.up_proj", x)
    return hidden + _linear(weights, f"{prefix}.mlp.down_proj", gate)


def _next_token_nll(weights: _Weights, head: TensorInfo, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the mean -log p(target) with logits computed over the vocabulary in blocks of ``lm_head`` rows."""
    log_norm = torch.full((hidden.shape[0],), -math.inf)
    target_logit = torch.zeros(hidden.shape[0])
    for start in range(0, head.rows, LM_HEAD_ROWS):
        stop = min(start + LM_HEAD_ROWS, head.rows)
        logits = hidden @ weights.rows(head, start, stop).T
        log_norm = torch.logaddexp(log_norm, torch.logsumexp(logits, dim=-1))
        inside = (targets >= start) & (targets < stop)
        rows = torch.nonzero(inside).flatten()
        target_logit[rows] = logits[rows, targets[rows] - start]
    return float((log_norm - target_logit).mean())
