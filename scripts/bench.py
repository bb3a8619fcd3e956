#!/usr/bin/env python
"""Benchmark `weight-diff recover` against the 2023 algorithm and this machine's I/O floor.

It builds synthetic LLaMA checkpoints laid out like the real ones (fp16 `.bin` shards with `inv_freq` buffers for
the raw model, fp32 `.bin` shards with one extra vocab row for a 2023-style diff), then times, each in its own
subprocess so that peak RSS is per run, with the page cache of the inputs dropped before each:

- ours:     `weight-diff recover --path_raw RAW --path_diff DIFF --path_tuned OUT --quiet`
- original: `scripts/original_weight_diff.py`'s `recover` (both models whole in fp32, add, `save_pretrained`)
- floor:    read every input file once, write as many bytes as the recovered model has, fdatasync

It checks that ours and the original give the same tensors, and prints a Markdown table plus an extrapolation
to the full 40-layer depth.

With `--meta` it also builds the raw model in the layout of Meta's original download (`meta/13B`: params.json,
checklist.chk, two `consolidated.0i.pth` model-parallel shards, cut from the `.bin` raw model) and times recover
from it, with and without the md5 check of checklist.chk, against recover from the `.bin`; both outputs must be
bit-identical.

Usage:
    python scripts/bench.py --quick                 # small widths, seconds
    python scripts/bench.py --layers 2              # LLaMA-13B widths, 2 layers: minutes, ~8 GB for the original
    python scripts/bench.py --layers 4 --original-layers 2 --out bench.md
    python scripts/bench.py --layers 8 --skip-original --repeat 3
    python scripts/bench.py --layers 6 --skip-original --skip-manifest --meta   # Meta's format against .bin
    python scripts/bench.py --hub --rate 400       # from a local hub look-alike capped at 400 MB/s (see below)

With `--hub`, the same checkpoints are served by tests/hub_server.py on 127.0.0.1 with a bandwidth cap, and it
times: the download alone (raw and diff into a fresh huggingface_hub cache, every file checked), a recover from
those downloaded files, and the one command `recover --path_raw bench/raw --path_diff bench/diff
--no-keep-download` (download and recovery together), with the peak disk used by the cache and the output.

Shards are 1 GB (real ones are ~10 GB) so that building needs little memory; built checkpoints are cached in
--cache-dir (default bench-cache/) by widths and depth. Every run starts with the page cache dropped.

The benchmark process itself imports no torch: building, the floor and the comparison run as subprocesses of
this same file (`bench.py _build|_floor|_compare ...`), so its own memory stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import mmap
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORIGINAL_SCRIPT = REPO / "scripts" / "original_weight_diff.py"
FULL_LAYERS = 40
BUILD_FORMAT = 2  # bump when the synthetic layout changes, so cached checkpoints are rebuilt
MARKER = "BENCH_COMPLETE.json"
META_MARKER = "META_COMPLETE.json"
META_SHARDS = 2  # LLaMA-13B's model-parallel shards
GB = 10**9
GIB = 2**30


# --------------------------------------------------------------------------------------------------------------
# What the synthetic checkpoints hold (pure: no torch, no files)


@dataclasses.dataclass(frozen=True)
class Widths:
    """The model widths, and how big a shard file may grow."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    shard_bytes: int


# Real shards are ~10 GB; 1 GB keeps the memory needed to build them modest (~1.5 GB peak) and gives even
# the 2-layer raw model several shards, as the real one has.
WIDTHS = {
    "13b": Widths("13b", hidden=5120, intermediate=13824, heads=40, vocab=32000, shard_bytes=GB),
    "quick": Widths("quick", hidden=512, intermediate=1376, heads=8, vocab=32000, shard_bytes=32 * 10**6),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint: `kind` picks its values ("weight", "norm" or "inv_freq")."""

    name: str
    shape: tuple[int, ...]
    kind: str

    def nbytes(self, itemsize: int) -> int:
        """Bytes on disk; `inv_freq` is a float32 buffer whatever the weights' dtype."""
        return math.prod(self.shape) * (4 if self.kind == "inv_freq" else itemsize)


def tensor_specs(widths: Widths, layers: int, *, role: str) -> list[TensorSpec]:
    """The tensors of a raw (vocab V, with inv_freq buffers) or diff (vocab V+1, no buffers) checkpoint.

    The order is that of a 2023 `save_pretrained` of a converted LLaMA.
    """
    h, i = widths.hidden, widths.intermediate
    vocab = widths.vocab if role == "raw" else widths.vocab + 1
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "weight")]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [TensorSpec(p + f"self_attn.{x}_proj.weight", (h, h), "weight") for x in "qkvo"]
        if role == "raw":
            specs.append(TensorSpec(p + "self_attn.rotary_emb.inv_freq", (h // widths.heads // 2,), "inv_freq"))
        specs += [
            TensorSpec(p + "mlp.gate_proj.weight", (i, h), "weight"),
            TensorSpec(p + "mlp.down_proj.weight", (h, i), "weight"),
            TensorSpec(p + "mlp.up_proj.weight", (i, h), "weight"),
            TensorSpec(p + "input_layernorm.weight", (h,), "norm"),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [
        TensorSpec("model.norm.weight", (h,), "norm"),
        TensorSpec("lm_head.weight", (vocab, h), "weight"),
    ]
    return specs


def itemsize_of(role: str) -> int:
    """Raw LLaMA is fp16; the 2023 diffs, and so the recovered model, are fp32."""
    return 2 if role == "raw" else 4


def plan_shards(specs: list[TensorSpec], itemsize: int, cap: int) -> list[list[TensorSpec]]:
    """Greedy shards of at most `cap` bytes (a bigger tensor gets a shard of its own), as save_pretrained does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.nbytes(itemsize)
        if shards[-1] and size + nbytes > cap:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def checkpoint_bytes(widths: Widths, layers: int) -> dict[str, int]:
    """Weight bytes of raw, diff and the recovered fp32 model (the diff's tensors: no buffers)."""
    raw = sum(s.nbytes(itemsize_of("raw")) for s in tensor_specs(widths, layers, role="raw"))
    diff = sum(s.nbytes(itemsize_of("diff")) for s in tensor_specs(widths, layers, role="diff"))
    return {"raw": raw, "diff": diff, "tuned": diff}


# --------------------------------------------------------------------------------------------------------------
# Building them (runs in a subprocess: `bench.py _build`)


def _make_tensor(spec: TensorSpec, role: str, widths: Widths):
    """Seeded values: raw weights ~N(0, 0.02), norms 1 + N(0, 0.02), diff ~N(0, 1e-3); inv_freq as LLaMA has it."""
    import torch

    if spec.kind == "inv_freq":
        head_dim = widths.hidden // widths.heads
        return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    generator = torch.Generator().manual_seed(zlib.crc32(f"{role}:{spec.name}".encode()))
    tensor = torch.randn(spec.shape, generator=generator).mul_(0.02 if role == "raw" else 1e-3)
    if role == "raw" and spec.kind == "norm":
        tensor.add_(1.0)
    return tensor.to(torch.float16 if role == "raw" else torch.float32)


def _write_bin_shards(directory: Path, role: str, widths: Widths, layers: int) -> None:
    """Write `pytorch_model-0000i-of-0000n.bin` shards and their index, holding one shard in RAM at a time.

    Not `weight_diff.tiny_llama.save_checkpoint`: it takes a whole state dict, which at 13B width is the very
    memory this benchmark is about.
    """
    import torch

    itemsize = itemsize_of(role)
    shards = plan_shards(tensor_specs(widths, layers, role=role), itemsize, widths.shard_bytes)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        filename = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        state = {spec.name: _make_tensor(spec, role, widths) for spec in shard}
        torch.save(state, directory / filename)
        del state
        for spec in shard:
            weight_map[spec.name] = filename
            total += spec.nbytes(itemsize)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_configs_and_tokenizer(directory: Path, role: str, widths: Widths, layers: int) -> None:
    """config.json, generation_config.json and tokenizer files as a 2023 raw LLaMA or diff has them.

    The tokenizer is `tiny_llama`'s LLaMA-style one (no LLaMA tokenizer ships in any pip package); the diff's
    adds `<pad>` = vocab, like the published diffs. Tools may load either, as the 2023 recover did.
    """
    import torch
    from transformers import GenerationConfig

    from weight_diff.tiny_llama import build_tokenizer, tiny_config

    config = tiny_config(
        vocab_size=widths.vocab if role == "raw" else widths.vocab + 1,
        hidden_size=widths.hidden,
        intermediate_size=widths.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=widths.heads,
        num_key_value_heads=widths.heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.float16 if role == "raw" else torch.float32
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer = build_tokenizer(widths.vocab)
    if role == "diff":
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        (directory / "added_tokens.json").write_text(json.dumps({"<pad>": widths.vocab}) + "\n")
    tokenizer.save_pretrained(directory)


def _build(widths: Widths, layers: int, root: Path) -> None:
    """Build `root/raw` and `root/diff`; the marker, written last, says the build is complete."""
    for role in ("raw", "diff"):
        directory = root / role
        directory.mkdir(parents=True, exist_ok=True)
        _write_bin_shards(directory, role, widths, layers)
        _write_configs_and_tokenizer(directory, role, widths, layers)
    for name in ("LICENSE.txt", "llama_license.txt"):
        (root / "diff" / name).write_text("Synthetic benchmark checkpoint: no licence terms.\n")
    os.sync()
    (root / MARKER).write_text(json.dumps(_marker(widths, layers)) + "\n")


def _build_meta(root: Path) -> None:
    """Build `root/meta/13B` from `root/raw`, one tensor read at a time (through weight-diff's reader)."""
    from weight_diff.checkpoint import Checkpoint
    from weight_diff.tiny_llama import save_meta_dir, tiny_config

    config = json.loads((root / "raw" / "config.json").read_text())
    shape = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps")}
    with Checkpoint.open(root / "raw") as raw:

        class Lazy(dict):
            def __getitem__(self, name: str):
                info = raw.tensors[name]
                return raw.read_rows(info, 0, info.rows).clone()

        tensors = Lazy.fromkeys(raw.tensors)
        save_meta_dir(root / "meta" / "13B", tensors, config=tiny_config(**shape), shards=META_SHARDS)
    os.sync()
    (root / "meta" / META_MARKER).write_text(json.dumps({"format": BUILD_FORMAT, "shards": META_SHARDS}) + "\n")


def ensure_meta(root: Path) -> tuple[Path, str]:
    """Meta's layout of the cached raw model, built (in a subprocess) unless complete already; and what was done."""
    meta = root / "meta"
    marker = meta / META_MARKER
    if marker.exists() and json.loads(marker.read_text()) == {"format": BUILD_FORMAT, "shards": META_SHARDS}:
        return meta / "13B", "cached"
    shutil.rmtree(meta, ignore_errors=True)
    log(f"building {root.name}/meta (Meta's layout, {META_SHARDS} shards) ...")
    start = time.perf_counter()
    if subprocess.run([sys.executable, __file__, "_build_meta", str(root)], check=False, env=_child_env()).returncode:
        raise SystemExit(f"bench: building {meta} failed (see above)")
    return meta / "13B", f"built in {time.perf_counter() - start:.0f} s"


def _marker(widths: Widths, layers: int) -> dict:
    """What a complete build records last, and what a cached one must match to be reused."""
    return {"format": BUILD_FORMAT, "widths": widths.name, "layers": layers}


def ensure_checkpoint(cache: Path, widths: Widths, layers: int) -> tuple[Path, str]:
    """The cached checkpoint for this depth, built (in a subprocess) unless complete already; and what was done."""
    root = cache / f"{widths.name}-{layers}L"
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()) == _marker(widths, layers):
        return root, "cached"
    shutil.rmtree(root, ignore_errors=True)
    log(f"building {root.name} (raw fp16 + diff fp32, {widths.name} widths, {layers} layers) ...")
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "_build", "--widths", widths.name, "--layers", str(layers), str(root)]
    if subprocess.run(cmd, check=False, env=_child_env()).returncode != 0:
        raise SystemExit(f"bench: building {root} failed (see above)")
    return root, f"built in {time.perf_counter() - start:.0f} s"


# --------------------------------------------------------------------------------------------------------------
# Fine-tunes for the codec benchmark (runs in a subprocess: `bench.py _finetune`)

# Standard deviation of tuned - raw per tensor kind, measured on a small LLaMA (hidden 256, 2 layers, vocab 512)
# pretrained 400 steps at lr 1e-3, then fine-tuned with AdamW (lr 2e-5, betas 0.9/0.999, no weight decay, 3%
# warmup then linear decay: open-instruct's and Alpaca's recipe) for 300 steps of batch 16 x 64 tokens on a new
# token distribution. AdamW's step is about lr per value whatever the width, so the absolute spread carries over
# to 13B width; the measured updates were lighter-tailed than a Gaussian (kurtosis 1.8-2.5), and a Gaussian of the
# same spread is the hardest to compress, so the model uses one. 96-98% of the matrices' bfloat16 values changed.
FINETUNE_DELTA_STD = {
    "embed_tokens": 1.25e-3,
    "q_proj": 1.0e-3,
    "k_proj": 1.0e-3,
    "v_proj": 1.07e-3,
    "o_proj": 1.05e-3,
    "gate_proj": 1.38e-3,
    "up_proj": 1.38e-3,
    "down_proj": 1.38e-3,
    "layernorm": 8.0e-4,
    "norm": 8.0e-4,
    "lm_head": 1.34e-3,
}


def _delta_std(name: str) -> float:
    return next(std for kind, std in FINETUNE_DELTA_STD.items() if kind in name)


def _build_finetune(widths: Widths, layers: int, dtype_name: str, directory: Path) -> None:
    """Write a modelled fine-tune of the cached raw model as safetensors shards of `dtype_name`.

    tuned = raw (its float16 values, in float32) + N(0, FINETUNE_DELTA_STD), rounded once to the tuned dtype; the
    added `<pad>` row starts from the mean of the raw rows, as Alpaca's resize does. One shard in memory at a time.
    """
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    directory.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(widths, layers, role="diff")
    shards = plan_shards(specs, dtype.itemsize, widths.shard_bytes)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for spec in shard:
            raw_shape = (widths.vocab, *spec.shape[1:]) if spec.shape[0] == widths.vocab + 1 else spec.shape
            raw = _make_tensor(dataclasses.replace(spec, shape=raw_shape), "raw", widths).float()
            if raw_shape != spec.shape:
                raw = torch.cat([raw, raw.double().mean(0, keepdim=True).float()])
            generator = torch.Generator().manual_seed(zlib.crc32(f"finetune:{spec.name}".encode()))
            raw += torch.randn(spec.shape, generator=generator).mul_(_delta_std(spec.name))
            state[spec.name] = raw.to(dtype)
            weight_map[spec.name] = filename
            total += spec.nbytes(dtype.itemsize)
        save_file(state, directory / filename, metadata={"format": "pt"})
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_configs_and_tokenizer(directory, "diff", widths, layers)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.sync()
    (directory / MARKER).write_text(json.dumps({**_marker(widths, layers), "finetune": dtype_name}) + "\n")


def ensure_finetune(root: Path, widths: Widths, layers: int, dtype_name: str) -> Path:
    """The cached fine-tune of `root/raw` in `dtype_name`, built in a subprocess unless complete already."""
    directory = root / f"tuned-{dtype_name}"
    marker = directory / MARKER
    if marker.exists() and json.loads(marker.read_text()) == {**_marker(widths, layers), "finetune": dtype_name}:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    log(f"building a {dtype_name} fine-tune in {directory} ...")
    cmd = [sys.executable, __file__, "_finetune", "--widths", widths.name, "--layers", str(layers)]
    cmd += ["--dtype", dtype_name, str(directory)]
    if subprocess.run(cmd, check=False, env=_child_env()).returncode != 0:
        raise SystemExit(f"bench: building {directory} failed (see above)")
    return directory


# --------------------------------------------------------------------------------------------------------------
# The I/O floor (runs in a subprocess: `bench.py _floor`)


def _floor(inputs: list[Path], out_file: Path, write_bytes: int) -> dict[str, float]:
    """Read every input file once with large reads, then write `write_bytes` and fdatasync (per GB and at the end).

    Gives the seconds of each phase. The bytes written are random, not zeros, so no layer below can take a shortcut.
    """
    start = time.perf_counter()
    buffer = bytearray(16 * 2**20)
    for directory in inputs:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
    read_s = time.perf_counter() - start
    block = os.urandom(64 * 2**20)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = since_sync = 0
        while written < write_bytes:
            n = os.write(fd, memoryview(block)[: min(len(block), write_bytes - written)])
            written += n
            since_sync += n
            if since_sync >= GB:
                os.fdatasync(fd)
                since_sync = 0
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return {"read_s": read_s, "write_s": time.perf_counter() - start - read_s}


def _disk_floor(inputs: list[Path], out_file: Path, write_bytes: int) -> dict[str, float]:
    """Move a recover's bytes as it moves them, all at once: each input directory's files read in order on a
    thread of its own, `write_bytes` of random bytes written on another, every stream through O_DIRECT in 8 MiB
    requests (buffered where the file system refuses it), the output fdatasynced at the end.

    This is the disk's speed for that recover: reads and writes share this machine's disk, so reading and writing
    at once takes longer than either alone, and nothing can recover faster than its bytes move.
    """
    chunk = 8 * 2**20
    direct = getattr(os, "O_DIRECT", 0)

    def open_direct(path: Path, flags: int) -> int:
        try:
            return os.open(path, flags | direct, 0o644)
        except OSError:
            return os.open(path, flags, 0o644)

    def read_all(directory: Path) -> None:
        buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            fd = open_direct(path, os.O_RDONLY)
            try:
                while os.readv(fd, [buffer]) == chunk:
                    pass
            finally:
                os.close(fd)

    def write_all() -> None:
        buffer = mmap.mmap(-1, chunk)
        buffer.write(os.urandom(chunk))  # random, not zeros: no layer below can take a shortcut
        out_file.parent.mkdir(parents=True, exist_ok=True)
        fd = open_direct(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            written = 0
            while written < write_bytes:  # whole pages: O_DIRECT writes no partial one (at most 4 KiB more)
                size = min(chunk, -(-(write_bytes - written) // 4096) * 4096)
                written += os.writev(fd, [memoryview(buffer)[:size]])
            os.fdatasync(fd)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(inputs) + 1) as pool:
        for future in [pool.submit(read_all, d) for d in inputs] + [pool.submit(write_all)]:
            future.result()
    return {"seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------------
# Comparing ours with the original (runs in a subprocess: `bench.py _compare`)


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single `model.safetensors`."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", framework="pt") as f:
        return {name: directory / "model.safetensors" for name in f.keys()}  # noqa: SIM118 (not iterable)


def _open(path: Path):
    """A safetensors handle that reads with pread where this safetensors has it, so mapped pages don't pile up."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:
        return safe_open(path, framework="pt")


def _compare(ours: Path, original: Path, raw_vocab: int) -> dict:
    """Tensor-by-tensor, in row chunks: bitwise equality and max |ours - original|, the added vocab rows apart."""
    ours_files, original_files = _weight_files(ours), _weight_files(original)
    result = {
        "tensors": 0,
        "only_in_ours": sorted(set(ours_files) - set(original_files)),
        "only_in_original": sorted(set(original_files) - set(ours_files)),
        "mismatched": [],
        "differing": [],
        "max_abs_diff": 0.0,
        "max_abs_diff_added_rows": 0.0,
        "identical_except_added_rows": True,
    }
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open(path)) for path in {*ours_files.values(), *original_files.values()}}
        for name in sorted(set(ours_files) & set(original_files)):
            a, b = handles[ours_files[name]].get_slice(name), handles[original_files[name]].get_slice(name)
            _compare_tensor(name, a, b, raw_vocab, result)
    if result["mismatched"] or result["only_in_ours"] or result["only_in_original"]:
        result["identical_except_added_rows"] = False
    return result


def _compare_tensor(name: str, a, b, raw_vocab: int, result: dict) -> None:
    """Fold one tensor's comparison (two safetensors slices) into `result`, 64 MiB of rows at a time.

    Rows from `raw_vocab` on of the embeddings are the added `<pad>` rows: their mean is computed in a
    different order by each tool, so they are held apart and only their max difference is reported.
    """
    import torch

    shape = a.get_shape()
    if shape != b.get_shape() or a.get_dtype() != b.get_dtype():
        result["mismatched"].append(f"{name}: {a.get_dtype()}{shape} vs {b.get_dtype()}{b.get_shape()}")
        return
    result["tensors"] += 1
    rows = shape[0]
    added_from = raw_vocab if name.endswith(("embed_tokens.weight", "lm_head.weight")) else rows
    step = max(1, (64 * 2**20) // (4 * math.prod(shape[1:])))
    for first, last, added in ((0, min(added_from, rows), False), (added_from, rows, True)):
        for start in range(first, last, step):
            x, y = a[start : min(last, start + step)], b[start : min(last, start + step)]
            key = "max_abs_diff_added_rows" if added else "max_abs_diff"
            result[key] = max(result[key], (x.float() - y.float()).abs().max().item())
            if not added and not torch.equal(x, y):
                result["identical_except_added_rows"] = False
                if name not in result["differing"]:
                    result["differing"].append(name)


# --------------------------------------------------------------------------------------------------------------
# Running and measuring (in the benchmark process: stdlib only)


@dataclasses.dataclass
class Run:
    """One timed subprocess: what it was, how long it took, its peak RSS, and the bytes it moved."""

    name: str
    layers: int
    status: str = "ok"
    wall_s: float | None = None
    sync_s: float | None = None
    peak_rss: int | None = None
    read_bytes: int = 0
    written_bytes: int = 0
    log_file: Path | None = None  # of the fastest repetition
    walls: list[float] = dataclasses.field(default_factory=list)  # every repetition's, in order
    cpus: list[float] = dataclasses.field(default_factory=list)  # every repetition's CPU seconds (user + system)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def drop_page_cache(files: list[Path]) -> str:
    """Flush dirty pages, then evict cached pages so every run starts cold; gives the method that worked.

    `drop_caches` needs root outside a container; `POSIX_FADV_DONTNEED` works anywhere but only on our inputs.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(POSIX_FADV_DONTNEED) on every input file"


@dataclasses.dataclass(frozen=True)
class Timing:
    """What `timed` measured of one subprocess."""

    rc: int
    wall: float
    peak_rss: int  # bytes
    sync: float  # the `sync` after it exited
    cpu: float  # user + system seconds of the process and the children it waited for


def timed(cmd: list[str], log_file: Path, timeout: float | None, env: dict[str, str] | None = None) -> Timing:
    """Run `cmd`; give its exit status, wall seconds, peak RSS (from wait4), the `sync` after it, and its CPU time.

    wait4's ru_maxrss is this child's alone (with the children it waited for), unlike RUSAGE_CHILDREN which
    is the maximum over every child so far. The `sync` after exit times the writes a run left to the kernel,
    so a run that does not fsync its output does not look faster than it is.
    """
    with open(log_file, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**_child_env(), **(env or {})}
        )
        timer = None
        if timeout:
            import threading

            timer = threading.Timer(timeout, lambda: os.kill(proc.pid, signal.SIGKILL))
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    start = time.perf_counter()
    os.sync()
    sync = time.perf_counter() - start
    return Timing(proc.returncode, wall, usage.ru_maxrss * 1024, sync, usage.ru_utime + usage.ru_stime)


def _child_env() -> dict[str, str]:
    """The environment of the runs: unbuffered, offline, and the repo's `src` importable."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _status_text(rc: int, log_file: Path, timed_out: bool) -> str:
    """A one-line reason for a failed run, with the last line of its output."""
    if timed_out:
        reason = "killed at --timeout"
    elif rc < 0:
        reason = f"killed by {signal.Signals(-rc).name}" + (" (out of memory?)" if rc == -signal.SIGKILL else "")
    else:
        reason = f"exit {rc}"
    lines = log_file.read_text(errors="replace").strip().splitlines()
    return f"{reason}: {lines[-1][:160]}" if lines else reason


def dir_bytes(directory: Path) -> int:
    """Bytes of all files directly in `directory`."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) if directory.exists() else 0


def input_files(root: Path) -> list[Path]:
    """Every file of the raw and diff checkpoints."""
    return [p for role in ("raw", "diff") for p in sorted((root / role).iterdir()) if p.is_file()]


def our_cli() -> list[str] | None:
    """The weight-diff command line, or None while the package does not exist yet."""
    if not (REPO / "src" / "weight_diff" / "cli.py").exists():
        return None
    script = Path(sys.executable).parent / "weight-diff"
    return [str(script)] if script.exists() else [sys.executable, "-m", "weight_diff.cli"]


def ours_command(raw: Path, diff: Path, tuned: Path) -> list[str] | None:
    """Our CLI with its default settings (integrity step included), or None while it does not exist yet."""
    base = our_cli()
    if base is None:
        return None
    return [*base, "recover", "--path_raw", str(raw), "--path_diff", str(diff), "--path_tuned", str(tuned), "--quiet"]


def original_command(raw: Path, diff: Path, tuned: Path) -> list[str] | None:
    """The reference 2023 algorithm through its own CLI, as the model card runs it (no test inference)."""
    if not ORIGINAL_SCRIPT.exists():
        return None
    paths = ["--path_raw", str(raw), "--path_diff", str(diff), "--path_tuned", str(tuned)]
    return [sys.executable, str(ORIGINAL_SCRIPT), "recover", *paths]


class Bench:
    """Runs the three contenders on cached checkpoints, one cold subprocess at a time, and keeps the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.widths = WIDTHS["quick" if args.quick else "13b"]
        self.cache = Path(args.cache_dir).resolve()
        self.out = self.cache / f"runs-{self.widths.name}"  # outputs (deleted after each run) and logs
        self.runs: list[Run] = []
        self.notes: list[str] = []
        self.comparisons: dict[int, dict] = {}
        self.codec_sizes: dict[str, dict[str, int]] = {}
        self.codec_rates: dict[str, tuple[float, float]] = {}
        self.codec_ratios: dict[str, list[float]] = {}  # recover from compact / from float32 diff, round by round
        self.codec_floors: dict[str, list[tuple[float, float]]] = {}  # (job s, its disk floor s), round by round
        self.drop_method = ""
        self.load_at_start = os.getloadavg()

    def _timed_run(
        self, name: str, layers: int, root: Path, cmd: list[str], out_dir: Path, inputs: list[Path] | None = None
    ) -> Run:
        """Run `cmd` cold `--repeat` times: the fastest wall (with its sync) and the largest peak RSS count.

        The output folder goes before each repetition (our CLI refuses a non-empty one), then the page cache.
        `inputs` are the directories it reads (default: the checkpoint's raw and diff).
        """
        return self._timed_rounds(layers, [(name, cmd, out_dir, inputs or [root / "raw", root / "diff"])])[0]

    def _timed_rounds(self, layers: int, specs: list[tuple[str, list[str], Path, list[Path]]]) -> list[Run]:
        """Run each `(name, cmd, out_dir, inputs)` cold once a round, `--repeat` rounds, in turn.

        Runs to be compared go in one call: this machine has slow spells of a minute or more, and a spell that
        fell on every repetition of one kind (they used to run back to back) made a ratio of fastest walls swing
        by 10-15%. Taking turns, a spell slows the runs of one round alike; `Run.walls` keeps every round's wall.
        """
        runs = [Run(name, layers, read_bytes=sum(dir_bytes(d) for d in inputs)) for name, _, _, inputs in specs]
        for repetition in range(1, self.args.repeat + 1):
            for run, (_, cmd, out_dir, inputs) in zip(runs, specs, strict=True):
                if run.ok:
                    self._run_once(run, repetition, cmd, out_dir, inputs)
        self.runs.extend(runs)
        return runs

    def _run_once(self, run: Run, repetition: int, cmd: list[str], out_dir: Path, inputs: list[Path]) -> None:
        shutil.rmtree(out_dir, ignore_errors=True)
        self.drop_method = drop_page_cache([p for d in inputs for p in sorted(d.iterdir()) if p.is_file()])
        log(f"running {run.name} at {run.layers} layers ({repetition}/{self.args.repeat}) ...")
        log_file = self._log(run, repetition)
        timing = timed(cmd, log_file, self.args.timeout)
        rc, wall, peak, sync = timing.rc, timing.wall, timing.peak_rss, timing.sync
        if rc != 0:
            timed_out = self.args.timeout is not None and wall >= self.args.timeout
            run.status = _status_text(rc, log_file, timed_out)
            log(f"{run.name} failed ({run.status}); log: {log_file}")
            return
        run.walls.append(wall)
        run.cpus.append(timing.cpu)
        run.peak_rss = max(run.peak_rss or 0, peak)
        if run.wall_s is None or wall < run.wall_s:
            run.wall_s, run.sync_s, run.log_file = wall, sync, log_file
        run.written_bytes = dir_bytes(out_dir)

    def _log(self, run: Run, repetition: int) -> Path:
        return self.out / f"{run.name}-{run.layers}L-{repetition}.log"

    def floor(self, layers: int, root: Path) -> None:
        """The I/O floor: read the inputs, write as many bytes as the recovered model; note each phase's speed."""
        out_dir = self.out / f"floor-{layers}L"
        write_bytes = checkpoint_bytes(self.widths, layers)["tuned"]
        cmd = [sys.executable, __file__, "_floor", str(root / "raw"), str(root / "diff")]
        cmd += ["--out-file", str(out_dir / "floor.bin"), "--write-bytes", str(write_bytes)]
        run = self._timed_run("floor", layers, root, cmd, out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        if run.ok:
            phases = json.loads(run.log_file.read_text().splitlines()[-1])
            self.notes.append(
                f"Floor at {layers} layers: read {run.read_bytes / GB:.2f} GB in {phases['read_s']:.1f} s "
                f"({run.read_bytes / GB / phases['read_s']:.2f} GB/s), wrote {write_bytes / GB:.2f} GB with fdatasync "
                f"in {phases['write_s']:.1f} s ({write_bytes / GB / phases['write_s']:.2f} GB/s)."
            )

    def contender(self, name: str, layers: int, root: Path) -> Path | None:
        """Run ours or the original into a fresh output folder; give that folder, or None if it did not run."""
        out_dir = self.out / f"{name}-{layers}L"
        if name == "ours":
            cmd = ours_command(root / "raw", root / "diff", out_dir)
            missing = "not run: weight_diff.cli does not exist yet"
        else:
            cmd = original_command(root / "raw", root / "diff", out_dir)
            missing = f"not run: {ORIGINAL_SCRIPT.relative_to(REPO)} does not exist yet"
        if cmd is None:
            self.runs.append(Run(name, layers, status=missing))
            return None
        return out_dir if self._timed_run(name, layers, root, cmd, out_dir).ok else None

    def publish_cycle(self, layers: int, root: Path, tuned: Path) -> None:
        """Time the publisher's side and a checked recovery: make-diff (raw, our recovered model) into a diff with
        a manifest, then recover from it with every raw tensor and result hashed against that manifest."""
        base = our_cli()
        published = self.out / f"published-{layers}L"
        make = [*base, "make-diff", "--path_raw", str(root / "raw"), "--path_tuned", str(tuned)]
        make += ["--path_diff", str(published), "--quiet"]
        if not self._timed_run("make-diff", layers, root, make, published, inputs=[root / "raw", tuned]).ok:
            return
        checked = self.out / f"ours-checked-{layers}L"
        cmd = [*base, "recover", "--path_raw", str(root / "raw"), "--path_diff", str(published)]
        cmd += ["--path_tuned", str(checked), "--quiet"]
        run = self._timed_run("ours, manifest-checked", layers, root, cmd, checked, inputs=[root / "raw", published])
        if run.ok and "verified:" not in run.log_file.read_text():
            run.status = "ran, but did not report verification"
        shutil.rmtree(published, ignore_errors=True)
        shutil.rmtree(checked, ignore_errors=True)

    def codec_cycle(self, layers: int, root: Path) -> None:
        """For a bfloat16 and a float32 fine-tune: make-diff float32 and compact, then recover from each, the
        recoveries taking turns round by round; sizes. make-diff compact and each recover take turns with their
        disk floor."""
        base = our_cli()
        raw = root / "raw"
        for dtype in ("bfloat16", "float32"):
            tuned = ensure_finetune(root, self.widths, layers, dtype)
            model_bytes = sum(p.stat().st_size for p in tuned.glob("*.safetensors"))
            sizes = {"model": model_bytes}
            recoveries, floors = [], []
            for fmt in ("float32", "compact"):
                diff = self.out / f"diff-{fmt}-{dtype}"
                make = [*base, "make-diff", "--format", fmt, "--path_raw", str(raw), "--path_tuned", str(tuned)]
                make += ["--path_diff", str(diff), "--quiet"]
                name = f"make-diff {fmt}, {dtype} tune"
                specs = [(name, make, diff, [raw, tuned])]
                if fmt == "compact":  # its floor writes as many bytes as the diff of the same round holds
                    specs.append(self._floor_spec(name, [raw, tuned], diff))
                run = self._timed_rounds(layers, specs)[0]
                if not run.ok:
                    return
                if fmt == "compact":
                    self._floor_ratios(layers, name)
                weights = [p for p in diff.iterdir() if p.suffix in (".safetensors", ".wdc")]
                sizes[f"{fmt} diff"] = sum(p.stat().st_size for p in weights)
                job_s = job_seconds(run.log_file)
                self.codec_rates[name] = (model_bytes / run.wall_s, model_bytes / job_s)
                options = [[]] if fmt == "compact" or dtype == "float32" else [[], ["--dtype", dtype]]
                for extra in options:
                    out = self.out / f"recovered-{fmt}-{dtype}"
                    cmd = [*base, "recover", "--path_raw", str(raw), "--path_diff", str(diff)]
                    cmd += ["--path_tuned", str(out), "--quiet", *extra]
                    name = f"recover from {fmt}{' ' + ' '.join(extra) if extra else ''}, {dtype} tune"
                    recoveries.append((name, cmd, out, [raw, diff]))
                written = model_bytes if fmt == "compact" else sizes["float32 diff"]
                floors.append(self._floor_spec(f"recover from {fmt}, {dtype} tune", [raw, diff], written))
            runs = {run.name: run for run in self._timed_rounds(layers, recoveries + floors)}
            plain, compact = runs[f"recover from float32, {dtype} tune"], runs[f"recover from compact, {dtype} tune"]
            if plain.ok and compact.ok:
                self.codec_ratios[dtype] = [c / p for c, p in zip(compact.walls, plain.walls, strict=True)]
            for fmt in ("float32", "compact"):
                self._floor_ratios(layers, f"recover from {fmt}, {dtype} tune")
            for _, _, out, _ in recoveries + floors:
                shutil.rmtree(out, ignore_errors=True)
            for fmt in ("float32", "compact"):
                shutil.rmtree(self.out / f"diff-{fmt}-{dtype}", ignore_errors=True)
                shutil.rmtree(self.out / f"disk floor of make-diff {fmt}, {dtype} tune", ignore_errors=True)
            numel = sizes["float32 diff"] // 4
            sizes["float16 delta"] = numel * 2
            self.codec_sizes[dtype] = sizes

    def _floor_spec(self, name: str, inputs: list[Path], written: int | Path) -> tuple:
        """The disk's speed for run `name`: its inputs read and its output written, all at once (`written`: the
        bytes, or a directory whose weight files hold as many when the floor runs)."""
        out = self.out / f"disk floor of {name}"
        cmd = [sys.executable, __file__, "_disk_floor", *map(str, inputs), "--out-file", str(out / "floor")]
        cmd += ["--write-like", str(written)] if isinstance(written, Path) else ["--write-bytes", str(written)]
        return (f"disk floor of {name}", cmd, out, inputs)

    def _floor_ratios(self, layers: int, name: str) -> None:
        """Keep run `name`'s job seconds and its floor's, round by round, when both ran."""
        runs = {run.name: run for run in self.runs if run.layers == layers}
        job, floor = runs.get(name), runs.get(f"disk floor of {name}")
        if job is not None and floor is not None and job.ok and floor.ok:
            self.codec_floors[name] = [
                (job_seconds(self._log(job, n)), json.loads(self._log(floor, n).read_text())["seconds"])
                for n in range(1, self.args.repeat + 1)
            ]

    def compare(self, layers: int, ours: Path, original: Path) -> None:
        """Compare the two outputs in a subprocess, which maps the files, not this process."""
        log(f"comparing ours with the original at {layers} layers ...")
        cmd = [sys.executable, __file__, "_compare", str(ours), str(original)]
        cmd += ["--raw-vocab", str(self.widths.vocab)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            self.notes.append(f"Comparison failed at {layers} layers: {done.stderr.strip().splitlines()[-1:]}")
            return
        self.comparisons[layers] = json.loads(done.stdout)

    def meta_runs(self, layers: int, root: Path, ours: Path) -> None:
        """Recover from Meta's layout of the same raw model, md5-checked and not; both must equal recover from .bin."""
        meta, how = ensure_meta(root)
        self.notes.append(f"Meta-format raw at {layers} layers: {how} ({meta}).")
        for name, extra in (("ours from Meta, --no-md5", ["--no-md5"]), ("ours from Meta, md5 checked", [])):
            out_dir = self.out / f"ours-meta-{layers}L"
            cmd = [*ours_command(meta, root / "diff", out_dir), *extra]
            run = self._timed_run(name, layers, root, cmd, out_dir, inputs=[meta, root / "diff"])
            if run.ok:
                same = subprocess.run(
                    [*our_cli(), "compare", str(out_dir), str(ours), "--quiet"],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    env=_child_env(),
                )
                verdict = "bit-identical to" if same.returncode == 0 else "DIFFERENT from"
                self.notes.append(f"{name} at {layers} layers: output {verdict} recover from the .bin raw.")
                if same.returncode != 0:
                    run.status = "output differs from recover from .bin"
            shutil.rmtree(out_dir, ignore_errors=True)

    def original_fits(self, layers: int) -> bool:
        """Whether the original's two fp32 models fit in available memory (it measured ~1.03x that here)."""
        need = 2 * checkpoint_bytes(self.widths, layers)["diff"] * 1.05
        available = mem_available()
        if need <= 0.9 * available:
            return True
        self.runs.append(
            Run(
                "original",
                layers,
                status=f"skipped: needs ~{need / GIB:.1f} GiB, {available / GIB:.1f} available",
            )
        )
        return False

    def run_all(self) -> None:
        """At each depth: floor, ours, and (at the original's depth) the original plus the comparison."""
        layers, k = self.args.layers, self.args.original_layers
        depths = sorted({layers} if self.args.skip_original else {layers, k})
        self.out.mkdir(parents=True, exist_ok=True)
        if self.args.codec:
            root, how = ensure_checkpoint(self.cache, self.widths, layers)
            self.notes.append(f"Checkpoint {root.name}: {how} ({root}).")
            self.codec_cycle(layers, root)
            return
        for depth in depths:
            root, how = ensure_checkpoint(self.cache, self.widths, depth)
            self.notes.append(f"Checkpoint {root.name}: {how} ({root}).")
            self.floor(depth, root)
            ours = self.contender("ours", depth, root)
            if ours and self.args.meta:
                self.meta_runs(depth, root, ours)
            if ours and not self.args.skip_manifest:
                self.publish_cycle(depth, root, ours)
            if depth == k and not self.args.skip_original and self.original_fits(depth):
                original = self.contender("original", depth, root)
                if ours and original:
                    self.compare(depth, ours, original)
            for name in ("ours", "original"):
                shutil.rmtree(self.out / f"{name}-{depth}L", ignore_errors=True)
        if not self.args.skip_original and k != layers:
            self.notes.append(f"The original ran at {k} layers only (memory); ours ran at {k} too, like for like.")


# --------------------------------------------------------------------------------------------------------------
# Reporting


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(bench: Bench) -> list[str]:
    """CPU, memory, disk and library versions: the context any number here needs."""
    free = shutil.disk_usage(bench.cache).free
    return [
        f"- CPUs: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {platform.machine()}",
        f"- RAM: {_meminfo('MemTotal') / GIB:.1f} GiB total, {mem_available() / GIB:.1f} GiB available at the end",
        f"- Disk free under {bench.cache}: {free / GB:.0f} GB",
        f"- Load average at the start: {bench.load_at_start[0]:.2f} (others' jobs slow the disk and CPUs)",
        (
            f"- Python {platform.python_version()}, torch {_version('torch')}, "
            f"transformers {_version('transformers')}, safetensors {_version('safetensors')}, "
            f"Linux {platform.release()}"
        ),
        f"- Page cache dropped before each run with: {bench.drop_method or 'n/a'}",
    ]


def runs_table(runs: list[Run]) -> list[str]:
    """One row per run: time, peak memory, bytes moved and their rate."""
    rows = [
        "| run | layers | wall s | sync after s | peak RSS GiB | read GB | written GB | GB/s | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        if not r.ok:
            rows.append(f"| {r.name} | {r.layers} |  |  |  |  |  |  | {r.status} |")
            continue
        rate = (r.read_bytes + r.written_bytes) / r.wall_s / GB
        cells = [r.wall_s, r.sync_s, r.peak_rss / GIB, r.read_bytes / GB, r.written_bytes / GB, rate]
        rows.append(f"| {r.name} | {r.layers} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {r.status} |")
    return rows


def _find(runs: list[Run], name: str, layers: int) -> Run | None:
    return next((r for r in runs if r.name == name and r.layers == layers and r.ok), None)


def ratios_table(runs: list[Run]) -> list[str]:
    """ours / floor, original / ours (time) and original / ours (peak RSS), each at one depth."""
    rows = ["| ratio | layers | value |", "| --- | ---: | ---: |"]
    for layers in sorted({r.layers for r in runs}):
        ours, floor, original = (_find(runs, n, layers) for n in ("ours", "floor", "original"))
        if ours and floor:
            rows.append(f"| ours / floor (time) | {layers} | {ours.wall_s / floor.wall_s:.2f}x |")
        checked = _find(runs, "ours, manifest-checked", layers)
        if checked and floor:
            rows.append(f"| ours manifest-checked / floor (time) | {layers} | {checked.wall_s / floor.wall_s:.2f}x |")
        if checked and ours:
            rows.append(f"| ours manifest-checked / ours (time) | {layers} | {checked.wall_s / ours.wall_s:.2f}x |")
        if ours and original:
            rows.append(f"| original / ours (time) | {layers} | {original.wall_s / ours.wall_s:.2f}x |")
            rows.append(f"| original / ours (peak RSS) | {layers} | {original.peak_rss / ours.peak_rss:.2f}x |")
    return rows if len(rows) > 2 else []


def comparison_lines(comparisons: dict[int, dict]) -> list[str]:
    """What the tensor-by-tensor check of ours against the original found."""
    lines = []
    for layers, c in sorted(comparisons.items()):
        verdict = "yes" if c["identical_except_added_rows"] else "NO"
        lines.append(
            f"- {layers} layers: {c['tensors']} tensors compared; bit-identical except the added vocab rows: "
            f"{verdict}; max |ours - original| = {c['max_abs_diff']:.3g} elsewhere, "
            f"{c['max_abs_diff_added_rows']:.3g} on the added rows."
        )
        for key in ("only_in_ours", "only_in_original", "mismatched", "differing"):
            if c[key]:
                lines.append(f"  - {key.replace('_', ' ')}: {', '.join(c[key][:6])}{' ...' if len(c[key]) > 6 else ''}")
    return lines


def codec_table(bench: Bench) -> list[str]:
    """Bytes of each kind of diff of each fine-tune, against the float32 diff; make-diff rates per model byte."""
    rows = ["| fine-tune | model GB | float32 diff GB | float16 delta GB | compact GB | compact / float32 diff |"]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype, s in bench.codec_sizes.items():
        cells = [s["model"], s["float32 diff"], s["float16 delta"], s["compact diff"]]
        ratio = s["compact diff"] / s["float32 diff"]
        rows.append(f"| {dtype} | " + " | ".join(f"{c / GB:.3f}" for c in cells) + f" | {ratio:.3f}x |")
    rows += ["", "float16 delta: the bytes of tune - raw stored as float16 (2 per value), computed, not written."]
    rows += ["", "make-diff speed in model bytes per second (wall of the process; of the job itself, without imports):"]
    rows += [f"- {name}: {wall / GB:.2f} GB/s; {job / GB:.2f} GB/s" for name, (wall, job) in bench.codec_rates.items()]
    if bench.codec_ratios:
        rows += ["", "recover from compact / from the float32 diff, wall against wall in each round (turn by turn):"]
    for dtype, ratios in bench.codec_ratios.items():
        each = ", ".join(f"{r:.2f}x" for r in ratios)
        rows.append(f"- {dtype} tune: {each} (median {statistics.median(ratios):.2f}x)")
    if bench.codec_floors:
        rows += ["", "the job (imports excluded) / its disk floor (its inputs read and its output written at once, "
                 "O_DIRECT), each round:"]  # fmt: skip
    for name, rounds in bench.codec_floors.items():
        each = ", ".join(f"{job:.1f}/{floor:.1f} s = {job / floor:.2f}x" for job, floor in rounds)
        rows.append(f"- {name}: {each} (median {statistics.median(j / f for j, f in rounds):.2f}x)")
    busy = [run for run in bench.runs if run.name in bench.codec_floors and run.cpus]
    if busy:
        rows += ["", "CPU seconds (user + system) / wall seconds of the whole process, each round; 2.0 would be both "
                 "cores busy throughout (its imports and start-up run on one):"]  # fmt: skip
    for run in busy:
        each = ", ".join(
            f"{cpu:.1f}/{wall:.1f} s = {cpu / wall:.2f}" for cpu, wall in zip(run.cpus, run.walls, strict=True)
        )
        rows.append(f"- {run.name}: {each}")
    return rows


def job_seconds(log_file: Path) -> float:
    """The seconds our CLI reports for its job (``... in N s``), imports and start-up excluded."""
    found = re.search(r" in ([0-9.]+) s$", log_file.read_text(), re.MULTILINE)
    if found is None:
        raise ValueError(f"{log_file}: no job time reported")
    return float(found.group(1))


def _moved(widths: Widths, layers: int) -> int:
    b = checkpoint_bytes(widths, layers)
    return b["raw"] + b["diff"] + b["tuned"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def extrapolate(runs: list[Run], widths: Widths) -> list[str]:
    """Time and peak RSS at 40 layers: a line through two or more depths, else scaled by bytes moved.

    With one depth, peak RSS scaled by bytes is right for the original (it holds both models whole); for ours
    and the floor, whose memory should not grow with depth, the table gives the measured value (flat) and the
    scaled one as a bound: two depths tell which.
    """
    rows = ["| run | time at 40 layers | peak RSS at 40 layers | how |", "| --- | ---: | ---: | --- |"]
    for name in ("floor", "ours", "original"):
        done = sorted((r for r in runs if r.name == name and r.ok), key=lambda r: r.layers)
        depths = sorted({r.layers for r in done})
        if not done:
            continue
        xs = [r.layers for r in done]
        t = statistics.linear_regression(xs, [r.wall_s for r in done]) if len(depths) >= 2 else None
        if t and t.slope > 0:
            m = statistics.linear_regression(xs, [r.peak_rss for r in done])
            wall = t.intercept + t.slope * FULL_LAYERS
            peak = f"{max(m.intercept + m.slope * FULL_LAYERS, max(r.peak_rss for r in done)) / GIB:.1f} GiB"
            how = f"line through {depths} layers: {t.intercept:.1f} s + {t.slope:.2f} s/layer"
        else:
            r = done[-1]
            factor = _moved(widths, FULL_LAYERS) / _moved(widths, r.layers)
            wall = r.wall_s * factor
            peak = f"{r.peak_rss * factor / GIB:.1f} GiB"
            if name != "original":
                peak = f"{r.peak_rss / GIB:.1f} (flat) to {peak}"
            how = f"{r.layers} layers scaled by bytes moved (x{factor:.1f})"
            if t:
                how += f"; no line: time fell with depth ({t.slope:.2f} s/layer), noise"
        rows.append(f"| {name} | {_duration(wall)} | {peak} | {how} |")
    b = checkpoint_bytes(widths, FULL_LAYERS)
    disk = (
        f"Disk at 40 layers ({widths.name} widths): raw {b['raw'] / GB:.1f} GB + diff {b['diff'] / GB:.1f} GB "
        f"+ recovered fp32 {b['tuned'] / GB:.1f} GB = {sum(b.values()) / GB:.1f} GB."
    )
    return (rows if len(rows) > 2 else []) + ["", disk]


LEGEND = (
    "wall: the process alone, the fastest of --repeat; "
    "sync after: `sync` right after it exits (the writes it left to the kernel); "
    "peak RSS: wait4's ru_maxrss, mapped file pages included."
)


def report(bench: Bench) -> str:
    """The whole Markdown report."""
    w = bench.widths
    title = (
        f"## weight-diff benchmark: {w.name} widths (hidden {w.hidden}, intermediate {w.intermediate}, "
        f"{w.heads} heads, vocab {w.vocab} raw / {w.vocab + 1} diff)"
    )
    parts = [title, "", *runs_table(bench.runs), ""]
    parts += [LEGEND, ""]
    ratios = ratios_table(bench.runs)
    if ratios:
        parts += ["### Ratios", "", *ratios, ""]
    if bench.comparisons:
        parts += ["### Ours against the original", "", *comparison_lines(bench.comparisons), ""]
    if bench.codec_sizes:
        parts += ["### Diff sizes", "", *codec_table(bench), ""]
    else:
        parts += ["### Extrapolation to 40 layers", "", *extrapolate(bench.runs, w), ""]
    parts += ["### Machine", "", *machine_facts(bench), ""]
    if bench.notes:
        parts += ["### Notes", "", *[f"- {n}" for n in bench.notes], ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# From the hub: download alone, download then recover, and the one pipelined command


def disk_bytes(paths: list[Path]) -> int:
    """Bytes allocated on disk under these directories (st_blocks: sparse or partial files count as written)."""
    total = 0
    for top in paths:
        for folder, _, names in os.walk(top):
            for name in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


class DiskPeak:
    """Samples the disk used under some directories every 0.1 s while a run goes on; `peak` is the largest seen."""

    def __init__(self, paths: list[Path]) -> None:
        import threading

        self.paths, self.peak, self._stop = paths, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, disk_bytes(self.paths))

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_bytes(self.paths))


def _weight_sums(directory: Path) -> dict[str, str]:
    """The SHA-256 of each weight shard, from the SHA256SUMS a finished run writes ({} when there is none)."""
    with contextlib.suppress(OSError):
        lines = (directory / "SHA256SUMS").read_text().splitlines()
        return {n.lstrip("*"): d for d, n in (line.split(maxsplit=1) for line in lines) if n.endswith(WEIGHT_ENDS)}
    return {}


WEIGHT_ENDS = (".safetensors", ".bin")


def hub_bench(args: argparse.Namespace) -> str:
    """Time recovery from a capped local hub against the download alone; return the Markdown report."""
    sys.path.insert(0, str(REPO / "tests"))
    from hub_server import HubServer

    widths = WIDTHS["quick" if args.quick else "13b"]
    cache = Path(args.cache_dir).resolve()
    root, how = ensure_checkpoint(cache, widths, args.layers)
    work = cache / f"hub-{widths.name}-{args.layers}L"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = HubServer(rate=args.rate * 1e6, lifetime=3 * 3600)
    log("publishing the checkpoints on the local hub (hashing them) ...")
    server.publish("bench/raw", root / "raw")
    server.publish("bench/diff", root / "diff")
    total = sum(f.size for repo in server.repos.values() for f in repo.files.values())
    rows: list[tuple[str, float, int, int, str]] = []  # name, wall, disk peak, peak RSS, status
    cli = our_cli() or []

    def run(name: str, cmd: list[str], hf_home: Path, measured: list[Path]) -> float:
        drop_page_cache(input_files(root))
        log(f"running {name} ...")
        with DiskPeak(measured) as disk:
            timing = timed(cmd, work / f"{name.split()[0]}.log", args.timeout, env=server.env(hf_home))
        rc, wall, rss, sync = timing.rc, timing.wall, timing.peak_rss, timing.sync
        log(f"{name}: {wall:.1f} s, then sync {sync:.1f} s (load {os.getloadavg()[0]:.1f})")
        status = "ok" if rc == 0 else _status_text(rc, work / f"{name.split()[0]}.log", False)
        rows.append((name, wall + sync, disk.peak, rss, status))
        return wall + sync

    try:
        server.start()
        first = work / "hf-download"
        download = run(
            "download alone", [sys.executable, __file__, "_download", "bench/raw", "bench/diff"], first, [first]
        )
        snapshots = {r: next((first / "hub" / f"models--bench--{r}" / "snapshots").iterdir()) for r in ("raw", "diff")}
        local = work / "out-local"
        after = run(
            "recover from the downloaded files",
            [*cli, "recover", "--path_raw", str(snapshots["raw"]), "--path_diff", str(snapshots["diff"]),
             "--path_tuned", str(local), "--quiet"],
            first, [first, local],
        )  # fmt: skip
        local_sums = _weight_sums(local)
        shutil.rmtree(first, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
        second, out = work / "hf-pipelined", work / "out-pipelined"
        pipelined = run(
            "one command, --no-keep-download",
            [*cli, "recover", "--path_raw", "bench/raw", "--path_diff", "bench/diff", "--path_tuned", str(out),
             "--no-keep-download", "--quiet"],
            second, [second, out],
        )  # fmt: skip
        same = _weight_sums(out) == local_sums and bool(local_sums)
        if not same:
            rows[-1] = (*rows[-1][:4], "OUTPUT DIFFERS from the recovery from downloaded files")
    finally:
        server.stop()
        shutil.rmtree(work / "hf-download", ignore_errors=True)
        shutil.rmtree(work / "out-local", ignore_errors=True)
        shutil.rmtree(work / "hf-pipelined", ignore_errors=True)
        shutil.rmtree(work / "out-pipelined", ignore_errors=True)
    sizes = checkpoint_bytes(widths, args.layers)
    lines = [
        f"## weight-diff from the hub: {widths.name} widths, {args.layers} layers, link capped at {args.rate:.0f} MB/s",
        "",
        f"Served: {total / GB:.2f} GB (raw {sizes['raw'] / GB:.2f} GB fp16 .bin, diff {sizes['diff'] / GB:.2f} GB fp32 "
        f".bin in {widths.shard_bytes / GB:g} GB shards); output {sizes['tuned'] / GB:.2f} GB. "
        f"Checkpoint {root.name}: {how}.",
        "",
        "| run | wall | vs download alone | disk peak (cache + output) | peak RSS | status |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, wall, disk, rss, status in rows:
        lines.append(
            f"| {name} | {wall:.1f} s | {wall / download:.2f}x | {disk / GB:.2f} GB | {rss / GIB:.2f} GiB | {status} |"
        )
    lines.append(f"| download, then recover | {download + after:.1f} s | {(download + after) / download:.2f}x | | | |")
    lines += [
        "",
        f"One command: {pipelined:.1f} s against {download:.1f} s for the download alone "
        f"({pipelined / download:.2f}x; goal at most 1.10x) and {download + after:.1f} s for download then recover. "
        f"Wall includes the `sync` after each run. Load average at the start: {os.getloadavg()[0]:.2f}. "
        "The one command's weight shards are byte for byte those of the recovery from the downloaded files "
        "(SHA256SUMS compared) unless its status says otherwise.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="depth of the synthetic model (default 2)")
    parser.add_argument(
        "--original-layers",
        type=int,
        default=None,
        help="depth at which the original runs, memory allowing (default min(layers, 2)); ours runs there too",
    )
    parser.add_argument("--quick", action="store_true", help="small widths (hidden 512): the whole run in seconds")
    parser.add_argument("--skip-original", action="store_true", help="do not run the 2023 algorithm")
    parser.add_argument(
        "--skip-manifest", action="store_true", help="do not time make-diff and the manifest-checked recover"
    )
    parser.add_argument(
        "--meta", action="store_true", help="also recover from the raw in Meta's original layout (2 shards)"
    )
    parser.add_argument(
        "--codec",
        action="store_true",
        help="diff sizes and times of make-diff/recover, float32 against compact, for bfloat16 and float32 fine-tunes",
    )
    parser.add_argument("--cache-dir", default=str(REPO / "bench-cache"), help="built checkpoints and outputs")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind; the fastest counts (default 1)")
    parser.add_argument("--timeout", type=float, default=None, help="kill a run after this many seconds")
    parser.add_argument("--hub", action="store_true", help="time recovery from a local hub look-alike instead")
    parser.add_argument("--rate", type=float, default=400.0, help="with --hub: the link's cap in MB/s (default 400)")
    args = parser.parse_args(argv)
    if args.original_layers is None:
        args.original_layers = min(args.layers, 2)
    if min(args.layers, args.original_layers, args.repeat) < 1:
        parser.error("--layers, --original-layers and --repeat must be at least 1")
    return args


def internal(argv: list[str]) -> None:
    """The subprocess entry points: `_build`, `_build_meta`, `_finetune`, `_floor`, `_disk_floor`, `_compare` and
    `_download`."""
    # Python put scripts/ first on sys.path, where scripts/weight_diff.py would shadow the weight_diff package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    parser = argparse.ArgumentParser(prog="bench.py (internal)")
    sub = parser.add_subparsers(dest="what", required=True)
    build = sub.add_parser("_build")
    build.add_argument("--widths", choices=sorted(WIDTHS), required=True)
    build.add_argument("--layers", type=int, required=True)
    build.add_argument("root", type=Path)
    floor = sub.add_parser("_floor")
    floor.add_argument("inputs", type=Path, nargs="+")
    floor.add_argument("--out-file", type=Path, required=True)
    floor.add_argument("--write-bytes", type=int, required=True)
    disk_floor = sub.add_parser("_disk_floor")
    disk_floor.add_argument("inputs", type=Path, nargs="+")
    disk_floor.add_argument("--out-file", type=Path, required=True)
    written = disk_floor.add_mutually_exclusive_group(required=True)
    written.add_argument("--write-bytes", type=int)
    written.add_argument("--write-like", type=Path, help="as many bytes as this directory's weight files hold")
    build_meta = sub.add_parser("_build_meta")
    build_meta.add_argument("root", type=Path)
    finetune = sub.add_parser("_finetune")
    finetune.add_argument("--widths", choices=sorted(WIDTHS), required=True)
    finetune.add_argument("--layers", type=int, required=True)
    finetune.add_argument("--dtype", choices=["bfloat16", "float32"], required=True)
    finetune.add_argument("directory", type=Path)
    compare = sub.add_parser("_compare")
    compare.add_argument("ours", type=Path)
    compare.add_argument("original", type=Path)
    compare.add_argument("--raw-vocab", type=int, required=True)
    download = sub.add_parser("_download")
    download.add_argument("repos", nargs="+")
    args = parser.parse_args(argv)
    if args.what == "_download":  # what a user's download alone costs: every file fetched and checked
        from weight_diff.sources.hub import input_dir

        for repo in args.repos:
            input_dir(repo)
    elif args.what == "_build":
        _build(WIDTHS[args.widths], args.layers, args.root)
    elif args.what == "_build_meta":
        _build_meta(args.root)
    elif args.what == "_finetune":
        _build_finetune(WIDTHS[args.widths], args.layers, args.dtype, args.directory)
    elif args.what == "_floor":
        print(json.dumps(_floor(args.inputs, args.out_file, args.write_bytes)))
    elif args.what == "_disk_floor":
        written = args.write_bytes
        if args.write_like is not None:
            written = sum(p.stat().st_size for p in args.write_like.iterdir() if p.suffix in (".safetensors", ".wdc"))
        print(json.dumps(_disk_floor(args.inputs, args.out_file, written)))
    else:
        print(json.dumps(_compare(args.ours, args.original, args.raw_vocab)))


def main(argv: list[str]) -> int:
    if argv and argv[0].startswith("_"):
        internal(argv)
        return 0
    args = parse_args(argv)
    if args.hub:
        text = hub_bench(args)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    bench = Bench(args)
    bench.cache.mkdir(parents=True, exist_ok=True)
    bench.run_all()
    text = report(bench)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"benchmark process peak RSS: {own / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
