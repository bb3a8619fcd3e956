"""Tell a model from a diff, so that a diff is never recovered onto, published as, or reported as a model.

A manifest marks a diff. Without one, the final RMSNorm decides: a trained model's norm weights average about 1,
a diff holds tuned - raw and its norm weights average about 0.

>>> with Checkpoint.open("llama-13b-hf") as raw:
...     classify(raw)
('model', 'final norm weights average 1.843, as in trained weights')
"""

from __future__ import annotations

from .checkpoint import Checkpoint, TensorInfo
from .manifest import MANIFEST_NAME

FINAL_NORM_NAMES = ("model.norm.weight", "norm.weight", "transformer.ln_f.weight")


def role_of(final_norm_mean_abs: float | None) -> str | None:
    """Return "model" or "diff" from the final norm's mean |weight|, None when it does not tell."""
    if final_norm_mean_abs is None:
        return None
    if final_norm_mean_abs < 0.05:
        return "diff"
    if final_norm_mean_abs > 0.2:
        return "model"
    return None


def final_norm_magnitude(checkpoint: Checkpoint) -> float | None:
    """Return the mean |value| of the final norm's weights (one small tensor read), None when there is none."""
    info = _final_norm(checkpoint.tensors)
    if info is None:
        return None
    return checkpoint.read_rows(info, 0, info.rows).float().abs().mean().item()


def _final_norm(tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    return next((tensors[name] for name in FINAL_NORM_NAMES if name in tensors), None)


def classify(checkpoint: Checkpoint) -> tuple[str, str]:
    """Return ("model" | "diff" | "unknown", the evidence for it)."""
    if (checkpoint.directory / MANIFEST_NAME).is_file():
        return "diff", f"has {MANIFEST_NAME}"
    norm = final_norm_magnitude(checkpoint)
    if norm is None:
        return "unknown", "no manifest and no final norm tensor to tell by"
    role = role_of(norm)
    if role == "diff":
        return "diff", f"no manifest; final norm weights average {norm:.3f}, as in tuned - raw"
    if role == "model":
        return "model", f"final norm weights average {norm:.3f}, as in trained weights"
    return "unknown", f"no manifest; final norm weights average {norm:.3f}, neither a model's (~1) nor a diff's (~0)"
