"""``weight-diff inspect``: a model or a diff (with or without a manifest), its sizes, and its checksums' verdict."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weight_diff.cli import main
from weight_diff.inspect_dir import inspect_path
from weight_diff.tiny_llama import make_raw_and_tuned, save_checkpoint

PARAMETERS_TUNED = 135_616  # 2 layers of 64 wide, vocab 321, untied embeddings
PARAMETERS_RAW = 135_488  # vocab 320


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """raw (float16 .bin with 2023 rotary buffers), tuned, its diff (with a manifest) and the model recovered."""
    work = tmp_path_factory.mktemp("inspect")
    raw, tuned = make_raw_and_tuned(work, raw_fmt="bin", inv_freq=True)
    runner = CliRunner()
    for command in (
        ["make-diff", "--path_raw", raw, "--path_tuned", tuned, "--path_diff", work / "diff", "-q"],
        [
            "recover",
            "--path_raw",
            raw,
            "--path_diff",
            work / "diff",
            "--path_tuned",
            work / "out",
            "-q",
            "--max-shard-size",
            "300KB",
        ],
    ):
        result = runner.invoke(main, list(map(str, command)))
        assert result.exit_code == 0, result.output
    return {"raw": raw, "tuned": tuned, "diff": work / "diff", "out": work / "out"}


@pytest.fixture
def diff_2023(dirs, tmp_path) -> Path:
    """The diff as the 2023 scripts published it: no manifest, no SHA256SUMS."""
    copy = shutil.copytree(dirs["diff"], tmp_path / "diff-2023")
    (copy / "weight-diff-manifest.json").unlink()
    (copy / "SHA256SUMS").unlink()
    return copy


def inspect(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["inspect", *map(str, args)])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def field(text: str, label: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith(label + ":"))


def test_a_recovered_model_is_a_verified_model(dirs):
    code, text = inspect(dirs["out"])

    assert code == 0
    assert text.splitlines()[0] == f"{dirs['out']}: a model"
    assert field(text, "kind").startswith("model (final norm weights average 1.0")
    assert field(text, "architecture") == "llama"
    assert field(text, "parameters") == f"{PARAMETERS_TUNED:,} in 21 tensors"
    assert field(text, "dtype") == "float32"
    assert field(text, "vocab size") == "321"
    size = sum(p.stat().st_size for p in dirs["out"].glob("*.safetensors"))
    assert field(text, "weights") == f"safetensors-sharded, 2 shards, {size / 1e6:.2f} MB"
    assert field(text, "checksums") == "verified copy: all 11 files match SHA256SUMS"
    assert field(text, "recovered").endswith("; verified against the publisher's manifest (21 tensors)")
    assert "expects base" not in text


def test_a_diff_with_a_manifest_names_the_base_it_expects(dirs):
    code, text = inspect(dirs["diff"])

    assert code == 0
    assert text.splitlines()[0] == f"{dirs['diff']}: a weight diff"
    assert field(text, "kind") == "diff (has weight-diff-manifest.json)"
    assert field(text, "expects base") == f"a model (hidden 64, vocab 320), float16, {PARAMETERS_RAW:,} parameters"
    assert field(text, "made by").startswith(f"weight_diff {version('weight-diff')}, torch ")
    assert field(text, "checksums") == "all 9 files match SHA256SUMS"
    assert "verified copy" not in text


def test_a_2023_diff_without_a_manifest_is_told_by_its_norm_weights(diff_2023):
    found = inspect_path(diff_2023)

    assert (found.kind, found.manifest) == ("diff", False)
    assert found.evidence.startswith("no manifest; final norm weights average 0.00")
    assert "  expects base:  not recorded (no manifest)" in found.lines()
    assert found.sums.status == "none"


def test_a_raw_bin_checkpoint_counts_weights_not_rotary_buffers(dirs):
    found = inspect_path(dirs["raw"])

    assert (found.kind, found.layout, found.shards) == ("model", "bin", 1)
    assert (found.parameters, found.dtypes, found.vocab_size) == (PARAMETERS_RAW, {"float16": PARAMETERS_RAW}, 320)
    assert found.sums.describe(found.kind) == "no SHA256SUMS (not written by weight-diff, or copied without it)"


def test_weights_neither_near_0_nor_near_1_are_of_unknown_role(dirs, tmp_path):
    with_odd_norm = shutil.copytree(dirs["tuned"], tmp_path / "odd")
    state = torch.load(dirs["raw"] / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = torch.full((64,), 0.1, dtype=torch.float16)
    save_checkpoint(state, with_odd_norm)

    found = inspect_path(with_odd_norm)

    assert found.kind == "unknown"
    assert "neither a model's (~1) nor a diff's (~0)" in found.evidence


def test_json_output_for_scripts(dirs):
    code, text = inspect(dirs["diff"], "--json")

    assert code == 0
    body = json.loads(text)
    assert (body["kind"], body["manifest"], body["parameters"], body["vocab_size"]) == (
        "diff",
        True,
        PARAMETERS_TUNED,
        321,
    )
    assert body["sums"] == {"status": "verified", "files": 9, "problems": [], "name": "SHA256SUMS"}
    assert body["base"].endswith(f"{PARAMETERS_RAW:,} parameters")


def test_a_changed_missing_or_unlisted_file_is_a_checksum_mismatch(dirs, tmp_path):
    model = shutil.copytree(dirs["out"], tmp_path / "out")
    shard = model / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (model / "generation_config.json").unlink()
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shutil.copy(model / index["weight_map"]["lm_head.weight"], model / "model-extra.safetensors")
    index["weight_map"]["lm_head.weight"] = "model-extra.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))

    code, text = inspect(model)

    assert code == 0
    assert field(text, "checksums") == (
        "SHA256SUMS mismatch: generation_config.json (missing), model-00002-of-00002.safetensors (content changed), "
        "model.safetensors.index.json (content changed), model-extra.safetensors (not listed)"
    )
    assert field(text, "kind").startswith("model")


def test_no_hash_skips_the_checksums(dirs):
    code, text = inspect(dirs["out"], "--no-hash")

    assert code == 0
    assert field(text, "checksums") == "SHA256SUMS present, not checked"


def test_a_directory_without_weights_is_one_line_of_error(tmp_path):
    code, text = inspect(tmp_path)

    assert code == 1
    assert text.startswith(f"error: {tmp_path}: no weights in a known layout")
    assert len(text.strip().splitlines()) == 1
