"""The 2023 conversion of Meta's LLaMA checkpoint, as transformers v4.28-v4.32's convert_llama_weights_to_hf.py
did it: every shard loaded whole, plain torch on whole tensors. The tests' independent reference for
``weight_diff.sources.meta``; checked once against transformers 4.31.0's script on 1, 2 and 4 shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def convert_2023(size_dir: Path) -> dict[str, torch.Tensor]:
    """Return the Hugging Face state dict (without rotary buffers) the 2023 script wrote for ``size_dir``."""
    params = json.loads((size_dir / "params.json").read_text())
    shards = sorted(size_dir.glob("consolidated.*.pth"))
    loaded = [torch.load(path, map_location="cpu", weights_only=True) for path in shards]
    dim, n_heads = params["dim"], params["n_heads"]
    per_shard = n_heads // len(shards)
    head_dim = dim // n_heads

    def permute(w: torch.Tensor) -> torch.Tensor:
        return w.view(n_heads, dim // n_heads // 2, 2, dim).transpose(1, 2).reshape(dim, dim)

    def cat(name: str, axis: int) -> torch.Tensor:
        return torch.cat([shard[name] for shard in loaded], dim=axis)

    def heads(name: str) -> torch.Tensor:
        return torch.cat([shard[name].view(per_shard, head_dim, dim) for shard in loaded], dim=0).reshape(dim, dim)

    state = {"model.embed_tokens.weight": cat("tok_embeddings.weight", 1)}
    for i in range(params["n_layers"]):
        prefix, meta = f"model.layers.{i}.", f"layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = permute(heads(meta + "attention.wq.weight"))
        state[prefix + "self_attn.k_proj.weight"] = permute(heads(meta + "attention.wk.weight"))
        state[prefix + "self_attn.v_proj.weight"] = heads(meta + "attention.wv.weight")
        state[prefix + "self_attn.o_proj.weight"] = cat(meta + "attention.wo.weight", 1)
        state[prefix + "mlp.gate_proj.weight"] = cat(meta + "feed_forward.w1.weight", 0)
        state[prefix + "mlp.down_proj.weight"] = cat(meta + "feed_forward.w2.weight", 1)
        state[prefix + "mlp.up_proj.weight"] = cat(meta + "feed_forward.w3.weight", 0)
        state[prefix + "input_layernorm.weight"] = loaded[0][meta + "attention_norm.weight"].clone()
        state[prefix + "post_attention_layernorm.weight"] = loaded[0][meta + "ffn_norm.weight"].clone()
    state["model.norm.weight"] = loaded[0]["norm.weight"].clone()
    state["lm_head.weight"] = cat("output.weight", 0)
    return state
