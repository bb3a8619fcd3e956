"""Shared fixtures: tiny random LLaMA checkpoints built in-process (nothing can be downloaded)."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def original():
    """The 2023 open-instruct/Alpaca algorithm (scripts/original_weight_diff.py): the reference we must match."""
    path = REPO / "scripts" / "original_weight_diff.py"
    spec = importlib.util.spec_from_file_location("original_weight_diff", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def build_pair(tmp_path_factory):
    """Return a factory of (raw_dir, tuned_dir) pairs, built once per set of options and shared read-only."""
    from weight_diff.tiny_llama import make_raw_and_tuned

    built: dict[str, tuple[Path, Path]] = {}

    def build(**options) -> tuple[Path, Path]:
        key = repr(sorted(options.items(), key=lambda item: item[0]))
        if key not in built:
            workdir = tmp_path_factory.mktemp("pair")
            built[key] = make_raw_and_tuned(workdir, **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def pair(build_pair):
    """The default pair: float16 safetensors raw (vocab 320), float32 tuned with an added <pad> (vocab 321)."""
    return build_pair()


@pytest.fixture(scope="session")
def made_diff(pair, tmp_path_factory):
    """A diff of the default pair made by our make-diff (with a manifest), in two shards."""
    from weight_diff.jobs import make_diff

    raw, tuned = pair
    out = tmp_path_factory.mktemp("made") / "diff"
    make_diff(raw, tuned, out, max_shard_size="300KB")
    return out


@pytest.fixture
def copy_dir(tmp_path):
    """Return a function copying a directory into this test's tmp_path (for tests that damage files)."""

    def copy(source: Path, name: str | None = None) -> Path:
        target = tmp_path / (name or source.name)
        shutil.copytree(source, target)
        return target

    return copy


def snapshot(directory: Path) -> dict[str, bytes]:
    """Return every file's bytes under a directory: inputs must be byte-for-byte unchanged after any run."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def interrupt_after(nbytes: int) -> Callable[[int], None]:
    """Return a progress callback that stops the run (KeyboardInterrupt, as Ctrl-C) once more than ``nbytes``
    have been reported: an interruption midway, at a point that does not depend on timing."""
    seen = {"bytes": 0}

    def progress(done: int) -> None:
        seen["bytes"] += done
        if seen["bytes"] > nbytes:
            raise KeyboardInterrupt

    return progress


def fill_disk_after(monkeypatch, nbytes: int, *, files: str = "", error: int = errno.ENOSPC) -> Callable[[], None]:
    """Make every ``os.write`` fail with ENOSPC (or ``error``) once ``nbytes`` more have been written (only to open
    files whose name ends with ``files``, when given); return the function that frees the space again."""
    real_write = os.write
    left = {"bytes": nbytes}

    def filling_write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(files):
            if left["bytes"] <= 0:
                raise OSError(error, os.strerror(error))
            left["bytes"] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    return lambda: monkeypatch.setattr(os, "write", real_write)


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Return all weights of a model directory, whatever its layout (small test models only)."""
    from weight_diff.checkpoint import Checkpoint

    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read_rows(info, 0, info.rows).clone() for name, info in checkpoint.tensors.items()}


@pytest.fixture(scope="session")
def legacy_diff(pair, original, tmp_path_factory):
    """A 2023-style diff of the default pair: float32 `.bin` shards, mean-extended pad rows, no manifest."""
    raw, tuned = pair
    out = tmp_path_factory.mktemp("legacy") / "diff"
    return original.make_diff(raw, tuned, out, added_rows="mean", fmt="bin", shards=2)


def _train(model, ids: torch.Tensor, *, seed: int, steps: int, lr: float, batch: int = 4, length: int = 256):
    """Train ``model`` in place for ``steps`` AdamW steps on random windows of ``ids`` (next-token loss)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        windows = torch.stack([ids[s : s + length] for s in starts])
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="session")
def trained(tmp_path_factory, original):
    """Tiny LLaMAs trained for real, so perplexity means something (a few seconds of CPU).

    ``raw``: 200 steps on English (tiny_llama's corpus and the quality text), float16 like LLaMA's release;
    ``tuned``: raw fine-tuned 40 more steps on instruction-formatted text, saved in float16 as most fine-tunes
    are; ``other_raw``: the same recipe from another seed, a base of the right shape and family that is not the
    one; ``diff``: the 2023-style diff (float32 ``.bin``, no manifest) of tuned against raw.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: threads only contend (7 engineers share 2 cores)
    try:
        return _train_family(tmp_path_factory.mktemp("trained"), original)
    finally:
        torch.set_num_threads(threads)


def _train_family(workdir: Path, original):
    from types import SimpleNamespace

    from transformers import LlamaForCausalLM

    from weight_diff.quality import QUALITY_TEXT
    from weight_diff.tiny_llama import CORPUS, build_tokenizer, save_model_dir, tiny_config

    config = tiny_config()
    tokenizer = build_tokenizer(config.vocab_size)
    english = torch.tensor(tokenizer(CORPUS + QUALITY_TEXT)["input_ids"])
    chat = "".join(f"<|user|>\n{line}\n<|assistant|>\n{line}\n" for line in CORPUS.splitlines())
    instructions = torch.tensor(tokenizer(chat + QUALITY_TEXT)["input_ids"])

    dirs = {}
    for name, seed in (("raw", 0), ("other_raw", 1)):
        torch.manual_seed(seed)
        model = _train(LlamaForCausalLM(config), english, seed=seed, steps=200, lr=5e-3)
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        dirs[name] = save_model_dir(workdir / name, state_dict=state, config=config, tokenizer=tokenizer,
                                    dtype=torch.float16)  # fmt: skip
        if name == "raw":
            tuned = LlamaForCausalLM(config)
            tuned.load_state_dict({n: t.to(torch.float16).float() for n, t in state.items()})  # from the stored base
            _train(tuned, instructions, seed=2, steps=40, lr=5e-4)
            dirs["tuned"] = save_model_dir(workdir / "tuned", state_dict=tuned.state_dict(), config=config,
                                           tokenizer=tokenizer, dtype=torch.float16)  # fmt: skip
    dirs["diff"] = original.make_diff(dirs["raw"], dirs["tuned"], workdir / "diff", fmt="bin")
    return SimpleNamespace(**dirs)
