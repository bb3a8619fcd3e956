"""Shared fixtures: tiny random LLaMA checkpoints built in-process (nothing can be downloaded)."""

from __future__ import annotations

import importlib.util
import shutil
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
