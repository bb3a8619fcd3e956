"""Meta's original LLaMA download as the raw model: read as the 2023 conversion made it, bit for bit, streaming.

Tiny LLaMA-1 checkpoints in Meta's layout (1, 2 and 4 model-parallel shards) are cut from a tiny Hugging Face
model; the reference is ``meta_reference.convert_2023`` (whole tensors in plain torch, as transformers 4.31's
script; checked against that script once).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import load_tensors, snapshot
from meta_reference import convert_2023
from weight_diff.checkpoint import Checkpoint, aligned_bytes
from weight_diff.cli import main
from weight_diff.compare import compare_models
from weight_diff.errors import CheckpointError, IntegrityError, PlanError
from weight_diff.inspect_dir import inspect_path
from weight_diff.jobs import make_diff, recover
from weight_diff.manifest import Manifest
from weight_diff.sizes import format_size
from weight_diff.sources.meta import rotary_rows
from weight_diff.tiny_llama import save_meta_dir, tiny_config

SHARD_COUNTS = (1, 2, 4)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(bits(a[n]), bits(b[n])) for n in a
    )


@pytest.fixture(scope="session")
def hf_raw(pair) -> dict[str, torch.Tensor]:
    """The default pair's raw model (float16, hidden 64, 4 heads, 2 layers, vocab 320), whole."""
    return load_tensors(pair[0])


@pytest.fixture(scope="session")
def meta_dirs(hf_raw, tmp_path_factory) -> dict[int, Path]:
    """Meta's layout of the raw model: ``LLaMA-N/13B`` with N shards, ``tokenizer.model`` in the parent."""
    dirs = {}
    for shards in SHARD_COUNTS:
        parent = tmp_path_factory.mktemp(f"LLaMA-{shards}")
        (parent / "tokenizer.model").write_bytes(b"not read by weight-diff")
        dirs[shards] = save_meta_dir(parent / "13B", hf_raw, config=tiny_config(), shards=shards)
    return dirs


def meta_copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "LLaMA" / source.name
    shutil.copytree(source, target)
    return target


def test_rotary_rows_are_the_2023_permutation():
    n_heads, head_rows, width = 4, 8, 3
    meta = torch.arange(n_heads * head_rows * width).reshape(n_heads * head_rows, width)
    script = meta.view(n_heads, head_rows // 2, 2, width).transpose(1, 2).reshape(n_heads * head_rows, width)
    assert torch.equal(meta[rotary_rows(0, n_heads * head_rows, head_rows)], script)
    assert torch.equal(meta[rotary_rows(5, 19, head_rows)], script[5:19])


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_the_split_is_the_inverse_of_the_2023_conversion(meta_dirs, hf_raw, shards):
    # The test checkpoints are right: converting them the 2023 way gives back the model they were cut from.
    assert same_tensors(convert_2023(meta_dirs[shards]), hf_raw)


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_meta_tensors_are_the_2023_conversion_bit_for_bit(meta_dirs, shards):
    reference = convert_2023(meta_dirs[shards])
    with Checkpoint.open(meta_dirs[shards]) as meta:
        assert meta.layout == "meta" and len(meta.files) == shards
        assert list(meta.tensors) == list(reference)  # rope.freqs dropped, Hugging Face order
        whole = {name: meta.read_rows(info, 0, info.rows).clone() for name, info in meta.tensors.items()}
        assert same_tensors(whole, reference)
        # Blocks that start and end inside a head, across heads and across shards, into reused buffers.
        aligned, plain = aligned_bytes(2**20), torch.empty(2**20, dtype=torch.uint8)
        for name, info in meta.tensors.items():
            for start, stop in ((0, 1), (3, 37), (15, 17), (info.rows - 9, info.rows), (31, 33)):
                stop = min(stop, info.rows)
                if start >= stop:
                    continue
                for out in (aligned, plain, None):
                    rows = meta.read_rows(info, start, stop, out=out)
                    assert torch.equal(bits(rows), bits(reference[name][start:stop])), (name, start, stop)


def test_norms_come_from_shard_0_as_in_the_2023_script(meta_dirs, tmp_path):
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    (size_dir / "checklist.chk").unlink()
    path = size_dir / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    torch.save({n: (t + 1 if n.endswith("norm.weight") else t).clone() for n, t in shard.items()}, path)
    assert same_tensors(load_tensors(size_dir), convert_2023(size_dir))


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_recover_from_meta_is_recover_from_its_conversion_and_is_verified(meta_dirs, pair, made_diff, tmp_path, shards):
    before = snapshot(meta_dirs[shards].parent)
    from_meta = recover(meta_dirs[shards].parent, made_diff, tmp_path / "from-meta")  # the parent, as Meta lays it out
    from_hf = recover(pair[0], made_diff, tmp_path / "from-hf")

    assert from_meta.verified  # every raw fingerprint and result matched a manifest made against the conversion
    assert same_tensors(load_tensors(tmp_path / "from-meta"), load_tensors(tmp_path / "from-hf"))
    assert from_hf.verified
    assert snapshot(meta_dirs[shards].parent) == before


def test_make_diff_from_meta_has_the_raw_fingerprints_of_the_conversion(meta_dirs, pair, made_diff, tmp_path):
    make_diff(meta_dirs[2], pair[1], tmp_path / "diff", max_shard_size="300KB")
    ours, reference = Manifest.load(tmp_path / "diff"), Manifest.load(made_diff)
    assert ours.tensors == reference.tensors


def test_a_compact_diff_made_and_recovered_with_meta_as_raw_is_the_conversions(meta_dirs, pair, tmp_path):
    # Raw rows (q/k gathered across heads, wo/w2 joined across shards) come from their own read lane here.
    make_diff(pair[0], pair[1], tmp_path / "from-hf", diff_format="compact", max_shard_size="300KB")
    make_diff(meta_dirs[2], pair[1], tmp_path / "from-meta", diff_format="compact", max_shard_size="300KB")
    wdc = sorted(path.name for path in (tmp_path / "from-hf").glob("*.wdc"))
    assert len(wdc) > 1 and wdc == sorted(path.name for path in (tmp_path / "from-meta").glob("*.wdc"))
    for name in wdc:
        assert (tmp_path / "from-meta" / name).read_bytes() == (tmp_path / "from-hf" / name).read_bytes()
    report = recover(meta_dirs[4].parent, tmp_path / "from-meta", tmp_path / "out")
    assert report.verified and same_tensors(load_tensors(tmp_path / "out"), load_tensors(pair[1]))


def test_compare_and_inspect_read_a_meta_directory(meta_dirs, pair):
    assert compare_models(meta_dirs[4], pair[0]).agrees
    found = inspect_path(meta_dirs[2])
    assert (found.kind, found.layout, found.shards, found.architecture) == ("model", "meta", 2, "LlamaForCausalLM")
    assert found.size == "LLaMA-1 of dim 64 (dim 64, 2 layers, norm_eps 1e-06), Meta's original format"
    assert found.sums.describe("model") == "all 3 files match checklist.chk (md5)"
    assert inspect_path(meta_dirs[2], check_sums=False).sums.status == "not checked"


def test_the_parent_of_several_sizes_picks_the_size_the_diff_needs(meta_dirs, build_pair, made_diff, tmp_path):
    parent = meta_copy(meta_dirs[2], tmp_path).parent
    small_raw, _ = build_pair(config_overrides={"hidden_size": 32, "intermediate_size": 96})
    save_meta_dir(parent / "7B", load_tensors(small_raw), config=tiny_config(hidden_size=32), shards=1)

    assert recover(parent, made_diff, tmp_path / "out").verified
    with pytest.raises(CheckpointError, match=r"holds several sizes \(7B, 13B\); give the one you mean, e.g. "):
        inspect_path(parent)
    with pytest.raises(PlanError, match=r"describes LLaMA-1 of dim 32 .* the diff is of hidden size 64 and 2 layers"):
        recover(parent / "7B", made_diff, tmp_path / "out2")


def test_a_missing_shard_is_named(meta_dirs, made_diff, tmp_path):
    size_dir = meta_copy(meta_dirs[4], tmp_path)
    (size_dir / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: missing \(listed in checklist.chk\)"):
        Checkpoint.open(size_dir)
    (size_dir / "checklist.chk").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: missing \(the directory has consolidated\.03"):
        Checkpoint.open(size_dir)
    (size_dir / "consolidated.03.pth").unlink()  # the last ones gone: the shapes say how many there must be
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pth: missing; each shard holds 1/4 of .* 4 shards"):
        recover(size_dir, made_diff, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_shard_is_named(meta_dirs, tmp_path):
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    shard = size_dir / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: its md5 differs from checklist\.chk"):
        Checkpoint.open(size_dir)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: damaged or incomplete .* download it again"):
        Checkpoint.open(size_dir, verify_md5=False)


def test_a_flipped_byte_fails_the_md5_and_without_it_the_manifest(meta_dirs, made_diff, tmp_path):
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    with Checkpoint.open(size_dir) as meta:
        piece = meta.tensors["model.layers.1.mlp.down_proj.weight"].assembly.pieces[1]
    with piece.file.open("r+b") as file:
        file.seek(piece.offset + 101)
        byte = file.read(1)
        file.seek(piece.offset + 101)
        file.write(bytes([byte[0] ^ 0x40]))

    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: its md5 differs from checklist\.chk"):
        recover(size_dir, made_diff, tmp_path / "out")
    with pytest.raises(IntegrityError, match=r"raw tensor model\.layers\.1\.mlp\.down_proj\.weight .* differs"):
        recover(size_dir, made_diff, tmp_path / "out", verify_md5=False)
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_checklist_naming_files_elsewhere_is_refused_before_reading_them(meta_dirs, tmp_path):
    size_dir = meta_copy(meta_dirs[1], tmp_path)
    with (size_dir / "checklist.chk").open("a") as checklist:
        checklist.write(f"{'0' * 32}  ../../secret\n")
    with pytest.raises(CheckpointError, match=r"checklist\.chk:3: names '\.\./\.\./secret', not a file of this"):
        Checkpoint.open(size_dir)


def test_shards_of_different_downloads_are_refused(meta_dirs, tmp_path):
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    (size_dir / "checklist.chk").unlink()
    shutil.copy(meta_dirs[4] / "consolidated.01.pth", size_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: does not belong with consolidated\.00\.pth"):
        Checkpoint.open(size_dir)


def test_llama_2_is_told_apart_from_llama_1(meta_dirs, made_diff, tmp_path):
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    params = json.loads((size_dir / "params.json").read_text())
    (size_dir / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-5}))
    with pytest.raises(CheckpointError, match=r"params\.json: its md5 differs"):
        recover(size_dir, made_diff, tmp_path / "out")
    (size_dir / "checklist.chk").unlink()
    with pytest.raises(PlanError, match=r"describes LLaMA-2 .* made from a model with rms_norm_eps 1e-06 \(LLaMA-1\)"):
        recover(size_dir, made_diff, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_recovers_from_meta_and_names_errors_in_one_line(meta_dirs, made_diff, tmp_path):
    def cli(*args: object):
        return CliRunner().invoke(main, ["recover", *(str(arg) for arg in args)])

    done = cli("--path_raw", meta_dirs[2].parent, "--path_diff", made_diff, "--path_tuned", tmp_path / "a")
    assert done.exit_code == 0, done.output
    assert "verified: 21 tensors match the publisher's manifest" in done.stdout
    listed = [*meta_dirs[2].glob("consolidated.*.pth"), meta_dirs[2] / "params.json"]
    to_read = format_size(sum(path.stat().st_size for path in listed))
    sums = f"checking the md5 sums of Meta's checklist.chk ({to_read} to read; --no-md5 skips)"
    assert sums in done.stderr
    size_dir = meta_copy(meta_dirs[2], tmp_path)
    (size_dir / "consolidated.01.pth").unlink()
    failed = cli("--path_raw", size_dir, "--path_diff", made_diff, "--path_tuned", tmp_path / "b", "-q")
    assert failed.exit_code == 1
    assert failed.stderr.strip().splitlines() == [
        f"error: {size_dir / 'consolidated.01.pth'}: missing (listed in checklist.chk); download it again"
    ]
    skipped = cli("--path_raw", meta_dirs[1], "--path_diff", made_diff, "--path_tuned", tmp_path / "c", "--no-md5")
    assert skipped.exit_code == 0, skipped.output
    assert "md5" not in skipped.stderr


def _edit_shard(size_dir: Path, change) -> None:
    """Rewrite consolidated.00.pth with ``change`` applied to its tensors, dropping the checklist that would say so."""
    shard = size_dir / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    change(state)
    torch.save(state, shard)
    (size_dir / "checklist.chk").unlink()


@pytest.mark.parametrize(
    "name, shape",
    [("layers.0.feed_forward.w3.weight", (0, 2**62)), ("layers.1.attention_norm.weight", (0,))],
    ids=str,
)
@pytest.mark.parametrize("command", ["recover", "inspect"])
def test_a_zero_size_tensor_in_a_meta_shard_is_refused_in_one_line(
    meta_dirs, made_diff, tmp_path, name, shape, command
):
    size_dir = meta_copy(meta_dirs[1], tmp_path)
    _edit_shard(size_dir, lambda state: state.update({name: torch.empty(shape, dtype=torch.float16)}))
    before = snapshot(size_dir)
    out = tmp_path / "out"
    args = (
        ["inspect", size_dir, "--no-hash"]
        if command == "inspect"
        else ["recover", "--path_raw", size_dir, "--path_diff", made_diff, "--path_tuned", out, "--quiet"]
    )
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert "consolidated.00.pth: tensor" in result.output and "has no values" in result.output, result.output
    assert snapshot(size_dir) == before and not out.exists()


def test_a_tensor_twice_in_a_meta_shard_is_refused_in_one_line(meta_dirs, made_diff, tmp_path):
    """layers.00 is layers.0 spelled again: two tensors for one weight, and no way to say which is meant."""
    size_dir = meta_copy(meta_dirs[1], tmp_path)
    _edit_shard(
        size_dir,
        lambda state: state.update({"layers.00.attention.wq.weight": state["layers.0.attention.wq.weight"] + 1}),
    )
    before = snapshot(size_dir)
    out = tmp_path / "out"
    args = ["recover", "--path_raw", size_dir, "--path_diff", made_diff, "--path_tuned", out, "--quiet"]
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert "tensor model.layers.0.self_attn.q_proj.weight is in both" in result.output, result.output
    assert snapshot(size_dir) == before and not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": NaN}', "not a Meta params.json: not valid JSON"),
        ("[" * 100000, "not valid JSON (nested too deeply)"),
        ("[64, 4]", "not a readable Meta params.json (TypeError: not a JSON object)"),
    ],
    ids=["nan", "nested", "list"],
)
def test_a_damaged_params_json_is_one_clear_refusal(meta_dirs, tmp_path, text, message):
    size_dir = meta_copy(meta_dirs[1], tmp_path)
    (size_dir / "params.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        Checkpoint.open(size_dir, verify_md5=False)
