"""``weight-diff demo``: the main job end to end on a tiny random LLaMA, so a newcomer sees it work in seconds."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .compare import compare_models
from .errors import WeightDiffError
from .jobs import make_diff, recover
from .sizes import format_size


def run_demo(*, keep: Path | None = None) -> Iterator[str]:
    """Yield what each step did: build base and fine-tune, make the diff, recover it, check it, load it."""
    if keep is not None:
        if keep.exists() and not keep.is_dir():
            raise WeightDiffError(f"{keep}: exists and is not a directory; give --keep a new directory")
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise WeightDiffError(f"{keep}: not empty; give --keep a new directory")
        yield from _demo(keep)
        return
    with tempfile.TemporaryDirectory(prefix="weight-diff-demo-") as workdir:
        yield from _demo(Path(workdir))


def _demo(workdir: Path) -> Iterator[str]:
    from .tiny_llama import make_raw_and_tuned

    started = time.monotonic()
    raw_dir, tuned_dir = make_raw_and_tuned(workdir, raw_fmt="bin", raw_dtype=torch.float16, inv_freq=True)
    yield (
        f"built a tiny random LLaMA base ({raw_dir}: float16 .bin, vocab 320) and a fine-tune of it "
        f"({tuned_dir}: float32, one added <pad> token, vocab 321; 2023 sentencepiece tokenizer files) in "
        f"{time.monotonic() - started:.1f} s"
    )
    diff_dir, out_dir = workdir / "diff", workdir / "recovered"
    made = make_diff(raw_dir, tuned_dir, diff_dir)
    yield (
        f"make-diff: {made.tensors} tensors, {format_size(made.bytes_written)} of float32 diff with a checksum "
        f"manifest, {made.seconds:.2f} s"
    )
    recovered = recover(raw_dir, diff_dir, out_dir)
    verdict = "verified against the manifest" if recovered.verified else "NOT verified"
    yield f"recover: {recovered.tensors} tensors into {out_dir}, {verdict}, {recovered.seconds:.2f} s"
    yield from (f"tokenizer: {note}" for note in made.notes + recovered.notes)

    check = compare_models(out_dir, tuned_dir, tol=1e-6)
    worst = check.max_abs_diff or 0.0
    identical = sum(t.identical or 0 for t in check.tensors)
    total = sum(t.numel for t in check.tensors)
    if not check.agrees:
        raise WeightDiffError(f"demo: the recovered model differs from the fine-tune by up to {worst:.3g}")
    if identical == total:
        yield f"check: recovered equals the fine-tune: all {total} values bit-identical"
    else:
        yield (
            f"check: recovered equals the fine-tune: {identical}/{total} values bit-identical, the rest within "
            f"float32 rounding (max |difference| {worst:.2g})"
        )
    yield _load_and_generate(out_dir)
    yield f"demo passed in {time.monotonic() - started:.1f} s"


def _load_and_generate(out_dir: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    inputs = tokenizer("the model", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return (
        f"transformers loads it: {type(model).__name__}, vocab {model.config.vocab_size}, "
        f"generated {output.shape[1] - inputs['input_ids'].shape[1]} tokens"
    )
