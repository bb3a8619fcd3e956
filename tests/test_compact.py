"""Compact diffs: the tuned model back bit for bit in its own dtype, damaged blocks named, verify, resume."""

import hashlib
import json
import os
import re
import shutil
import struct
import time

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import fill_disk_after, interrupt_after, snapshot
from weight_diff import codec, compact, output, writer
from weight_diff.cli import main
from weight_diff.errors import IntegrityError
from weight_diff.jobs import make_diff, recover
from weight_diff.verify import verify


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def plain_tensors(directory):
    """Every tensor of a safetensors model directory, read with safetensors itself (the independent reader)."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_bit_identical(recovered, tuned):
    assert recovered.keys() == tuned.keys()
    for name, expected in tuned.items():
        got = recovered[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), name


@pytest.fixture(scope="module")
def compact_pairs(build_pair, tmp_path_factory):
    """For each tuned dtype: (raw, tuned, compact diff in several files)."""
    made = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        raw, tuned = build_pair(tuned_dtype=dtype)
        diff = tmp_path_factory.mktemp("compact") / "diff"
        make_diff(raw, tuned, diff, diff_format="compact", max_shard_size="150KB")
        made[dtype] = raw, tuned, diff
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_recover_gives_the_tuned_model_bit_for_bit_in_its_own_dtype(compact_pairs, dtype, tmp_path):
    raw, tuned, diff = compact_pairs[dtype]
    assert len(list(diff.glob("*.wdc"))) >= 2 and not list(diff.glob("*.safetensors"))
    # Each .wdc file's SHA-256 (hashed beside its writes, on a lane of its own) is the file's.
    listed = dict(line.split("  ")[::-1] for line in (diff / "SHA256SUMS").read_text().splitlines())
    for path in diff.glob("*.wdc"):
        assert listed[path.name] == hashlib.sha256(path.read_bytes()).hexdigest(), path.name
    report = recover(raw, diff, tmp_path / "out", max_shard_size="150KB")
    assert report.verified
    recovered = plain_tensors(tmp_path / "out")
    expected = plain_tensors(tuned)
    assert_bit_identical(recovered, expected)
    # The added <pad> row is there, and the raw rows are not silently equal to raw's.
    raw_tensors = plain_tensors(raw)
    embed = "model.embed_tokens.weight"
    assert recovered[embed].shape[0] == raw_tensors[embed].shape[0] + 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(dtype).removeprefix("torch.")


def test_a_compact_run_leaves_torch_threads_of_the_process_as_they_were(compact_pairs, tmp_path):
    # Its lanes run torch on one thread each; a caller's threads started afterwards (generate in the same process,
    # a library user's) once got one thread too.
    import threading

    raw, tuned, diff = compact_pairs[torch.bfloat16]
    before = torch.get_num_threads()
    make_diff(raw, tuned, tmp_path / "again", diff_format="compact")
    recover(raw, diff, tmp_path / "out")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before] and torch.get_num_threads() == before


def test_a_bfloat16_compact_diff_is_far_smaller_than_the_float32_diff(compact_pairs, tmp_path):
    raw, tuned, diff = compact_pairs[torch.bfloat16]
    make_diff(raw, tuned, tmp_path / "f32")
    compact = sum(p.stat().st_size for p in diff.glob("*.wdc"))
    float32 = sum(p.stat().st_size for p in (tmp_path / "f32").glob("*.safetensors"))
    assert compact < 0.45 * float32


def test_a_tensor_without_raw_counterpart_is_stored_and_recovered(build_pair, copy_dir, tmp_path):
    raw, tuned = build_pair(tuned_dtype=torch.bfloat16)
    tuned = copy_dir(tuned, "tuned")
    tensors = load_file(tuned / "model.safetensors")
    tensors["model.mm_projector.weight"] = torch.randn(24, 64).to(torch.bfloat16)
    tensors["model.mm_projector.bias"] = torch.randn(24).to(torch.bfloat16)
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    make_diff(raw, tuned, tmp_path / "diff", diff_format="compact")
    manifest = json.loads((tmp_path / "diff" / "weight-diff-manifest.json").read_text())
    assert manifest["tensors"]["model.mm_projector.weight"]["raw"] is None
    report = recover(raw, tmp_path / "diff", tmp_path / "out")
    assert report.verified
    assert_bit_identical(plain_tensors(tmp_path / "out"), tensors)


def test_the_container_index_lists_with_plain_python(compact_pairs):
    _, tuned, diff = compact_pairs[torch.bfloat16]
    names = set()
    for path in sorted(diff.glob("*.wdc")):
        data = path.read_bytes()
        length, magic = struct.unpack("<Q8s", data[-16:])
        index = json.loads(data[-16 - length : -16])
        assert data[:8] == magic == b"WDCOMPCT" and index["format"] == "weight-diff-compact" and index["version"] == 3
        for name, entry in index["tensors"].items():
            names.add(name)
            rows = [block[:2] for block in entry["blocks"]]
            assert rows[0][0] == 0 and rows[-1][1] == entry["shape"][0]  # every row, in order
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    assert names == set(plain_tensors(tuned))


def damage_block(diff, tensor):
    """Flip one byte in the middle of the first block of ``tensor``; return the file damaged."""
    for path in sorted(diff.glob("*.wdc")):
        data = bytearray(path.read_bytes())
        length = struct.unpack("<Q", data[-16:-8])[0]
        index = json.loads(bytes(data[-16 - length : -16]))
        if tensor in index["tensors"]:
            _, _, offset, size = index["tensors"][tensor]["blocks"][0]
            data[offset + size // 2] ^= 0x40
            path.write_bytes(bytes(data))
            return path
    raise AssertionError(tensor)


def test_a_second_copy_of_a_compact_file_is_refused_before_anything_is_written(compact_pairs, copy_dir, tmp_path):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, "duplicate")
    first = sorted(diff.glob("*.wdc"))[0]
    shutil.copy(first, diff / f"{first.stem} (1).wdc")  # a browser's repeated download
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"is in both {first.stem} (1).wdc and {first.name}" in result.output  # in file name order
    assert "keep only the files the diff's SHA256SUMS lists" in result.output
    assert not (tmp_path / "out").exists()
    checked = run("verify", diff)  # verify says the same of the folder, not "verified" with a note
    assert checked.exit_code == 1 and f"also in {first.stem} (1).wdc" in checked.output, checked.output


def test_make_diff_refuses_rows_wider_than_recover_reads(build_pair, monkeypatch, tmp_path):
    from weight_diff import compact

    raw, tuned = build_pair()
    monkeypatch.setattr(compact, "MAX_ROW_VALUES", 32)  # the tiny model's rows hold 64 values and more
    result = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", tuned,
                 "--path_diff", tmp_path / "d", "--quiet")  # fmt: skip
    assert result.exit_code == 1 and "values; the compact format takes rows of up to 32: use --format float32" in (
        result.output
    )
    assert not (tmp_path / "d").exists()


def test_a_file_of_another_diff_of_the_same_raw_is_blamed_not_the_raw(compact_pairs, copy_dir, tmp_path):
    raw, tuned, diff = compact_pairs[torch.bfloat16]
    other = copy_dir(tuned, "another-tune")
    weights = sorted(other.glob("*.safetensors"))
    changed = {}
    for path in weights:
        tensors = load_file(path)
        if UP in tensors:
            tensors[UP] = tensors[UP] * 1.5
            changed = tensors
            save_file(tensors, path, metadata={"format": "pt"})
    assert changed
    make_diff(raw, other, tmp_path / "other-diff", diff_format="compact", max_shard_size="150KB")
    mixed = copy_dir(diff, "mixed")
    holder = next(p for p in sorted(mixed.glob("*.wdc")) if UP.encode() in p.read_bytes()[-100_000:])
    shutil.copy(tmp_path / "other-diff" / holder.name, holder)  # same name, same tensors, another fine-tune's
    with pytest.raises(IntegrityError, match=re.escape(f"{holder} differs from the diff's checksums")):
        recover(raw, mixed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit", ["shape", "name"])
def test_an_index_that_disagrees_with_the_manifest_is_blamed_not_the_raw(compact_pairs, copy_dir, tmp_path, edit):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, f"index-{edit}")
    path = next(p for p in sorted(diff.glob("*.wdc")) if UP.encode() in p.read_bytes()[-100_000:])

    def change(index):
        if edit == "shape":  # one more column, and the raw it was coded against with it
            index["tensors"][UP]["shape"][1] += 2
        else:
            index["tensors"][UP.replace("weight", "wexght")] = index["tensors"].pop(UP)

    _edit_index(path, change)
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert f"error: {path}: " in result.output and "download it again" in result.output
    assert "your raw model" not in result.output and "the raw model, which lacks it" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_compact_diff_missing_every_wdc_file_names_the_missing_file(compact_pairs, copy_dir, tmp_path):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, "no-wdc")
    first = sorted(diff.glob("*.wdc"))[0].name
    for path in diff.glob("*.wdc"):
        path.rename(path.with_suffix(".wdc.bak"))
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1 and f"{first}: compact file named in the manifest is missing" in result.output
    assert not (tmp_path / "out").exists()


def test_a_damaged_block_is_named_and_no_model_is_written(compact_pairs, copy_dir, tmp_path):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, "damaged")
    damaged = damage_block(diff, "model.layers.1.mlp.up_proj.weight")
    out = tmp_path / "out"
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--quiet")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {damaged}: block 0 of tensor model.layers.1.mlp.up_proj.weight (rows 0:")
    assert f"download {damaged.name} again" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))

    checked = run("verify", diff)
    assert checked.exit_code == 1
    assert "model.layers.1.mlp.up_proj.weight" in checked.output and "block 0" in checked.output


def test_a_different_raw_model_is_named(compact_pairs, copy_dir, tmp_path):
    raw, _, diff = compact_pairs[torch.bfloat16]
    raw = copy_dir(raw, "other-raw")
    tensors = load_file(raw / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][3, 5] += 1
    save_file(tensors, raw / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="raw tensor model.layers.0.self_attn.q_proj.weight .* differs"):
        recover(raw, diff, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_verify_proves_the_recovered_model_is_the_publishers(compact_pairs, tmp_path):
    raw, tuned, diff = compact_pairs[torch.bfloat16]
    assert verify(diff).ok
    out = tmp_path / "out"
    recover(raw, diff, out)
    report = verify(out, diff=diff)
    tensor_checks = [check for check in report.checks if "(" in check.subject]
    assert report.ok and len(tensor_checks) == len(plain_tensors(tuned)) and not report.notes

    # One value changed in the recovered model: its tensor is named (and its file, by SHA256SUMS).
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"][0] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    failed = {check.subject.split(" ")[0] for check in verify(out, diff=diff).failures}
    assert failed == {"model.safetensors", "model.norm.weight"}


def test_make_diff_and_recover_resume_to_the_identical_result(build_pair, tmp_path):
    raw, tuned = build_pair(tuned_dtype=torch.bfloat16)
    make_diff(raw, tuned, tmp_path / "reference", diff_format="compact", max_shard_size="60KB")
    diff = tmp_path / "diff"
    with pytest.raises(KeyboardInterrupt):
        make_diff(raw, tuned, diff, diff_format="compact", max_shard_size="60KB", progress=interrupt_after(150_000))
    assert not list(diff.glob("*.partial")) and (diff / output.JOURNAL_NAME).is_file()
    report = make_diff(raw, tuned, diff, diff_format="compact", max_shard_size="60KB", resume=True)
    assert report.resumed_shards >= 2
    assert snapshot(diff) == snapshot(tmp_path / "reference")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(raw, diff, out, max_shard_size="60KB", progress=interrupt_after(150_000))
    assert not (out / "config.json").exists()
    report = recover(raw, diff, out, max_shard_size="60KB", resume=True)
    assert report.resumed_shards >= 2 and report.verified
    assert_bit_identical(plain_tensors(out), plain_tensors(tuned))


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_a_disk_filling_up_during_compact_make_diff_stops_cleanly_and_resume_finishes(
    build_pair, tmp_path, monkeypatch, direct
):
    raw, tuned = build_pair(tuned_dtype=torch.bfloat16)
    make_diff(raw, tuned, tmp_path / "reference", diff_format="compact", max_shard_size="60KB")
    if not direct:  # a file system without O_DIRECT: every .wdc is written buffered
        real_open = os.open
        monkeypatch.setattr(writer.os, "open", lambda path, flags, mode=0o777: real_open(
            path, flags & ~getattr(os, "O_DIRECT", 0), mode))  # fmt: skip
    free_space = fill_disk_after(monkeypatch, 20_000, files=".wdc.partial")  # of about 50 KB of .wdc files
    diff = tmp_path / "diff"
    result = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", tuned, "--path_diff", diff,
                 "--max-shard-size", "60KB", "--quiet")  # fmt: skip
    assert result.exit_code == 1 and "disk full while writing diff-" in result.output, result.output
    assert "Traceback" not in result.output and not list(diff.glob("*.partial"))
    kept = sorted(diff.glob("*.wdc"))
    assert kept and len(kept) < len(list((tmp_path / "reference").glob("*.wdc")))

    free_space()
    resumed = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", tuned, "--path_diff", diff,
                  "--max-shard-size", "60KB", "--quiet", "--resume")  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert snapshot(diff) == snapshot(tmp_path / "reference")


def test_the_cli_makes_a_compact_diff_and_recover_detects_it(build_pair, tmp_path):
    raw, tuned = build_pair(tuned_dtype=torch.float16)
    made = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", tuned, "--path_diff",
               tmp_path / "diff", "--quiet")  # fmt: skip
    assert made.exit_code == 0, made.output
    recovered = run("recover", "--path_raw", raw, "--path_diff", tmp_path / "diff", "--path_tuned", tmp_path / "out",
                    "--quiet")  # fmt: skip
    assert recovered.exit_code == 0, recovered.output
    assert "verified: 21 tensors match the publisher's manifest" in recovered.output
    assert_bit_identical(plain_tensors(tmp_path / "out"), plain_tensors(tuned))
    refused = run("recover", "--path_raw", raw, "--path_diff", tmp_path / "diff", "--path_tuned", tmp_path / "o2",
                  "--dtype", "float32")  # fmt: skip
    assert refused.exit_code == 2 and "in its own dtype; omit --dtype" in refused.output


def test_a_block_is_split_into_steps_top_second_and_low_bytes():
    # int16, little-endian: 34 12 | CD 00 | CD AB. Values 0 and 2 have a non-zero highest byte: steps 1 and 2.
    values = torch.tensor([0x1234, 0x00CD, 0xABCD - 0x10000], dtype=torch.int16)
    sections, sparse_end = codec.split_residual(values, torch.empty(16, dtype=torch.uint8))
    assert sections.tolist() == [1, 2, 0x12, 0xAB, 0x34, 0xCD, 0xCD] and sparse_end == 4
    assert torch.equal(codec.join_residual(sections, torch.empty(3, dtype=torch.int16)), values)
    wide = torch.tensor([0x12345678, 0x000B0C0D], dtype=torch.int32)  # low 16 bits kept as stored: 78 56, 0D 0C
    sections, sparse_end = codec.split_residual(wide, torch.empty(16, dtype=torch.uint8))
    assert sections.tolist() == [1, 0x12, 0x34, 0x0B, 0x78, 0x56, 0x0D, 0x0C] and sparse_end == 2
    assert torch.equal(codec.join_residual(sections, torch.empty(2, dtype=torch.int32)), wide)
    with pytest.raises(codec.BlockError, match="decodes to 7 bytes, which no block of 2 values takes"):
        codec.join_residual(sections[:7], torch.empty(2, dtype=torch.int32))
    for steps in ([3], [2, 1], [0]):  # past the end, or before the start
        bad = np.array([*steps, *[0x12] * len(steps), 0x34, 0x0B, 0x78, 0x56, 0x0D, 0x0C], dtype=np.uint8)
        with pytest.raises(codec.BlockError, match="its steps lead outside the block"):
            codec.join_residual(bad, torch.empty(2, dtype=torch.int32))


def test_a_step_over_255_values_is_taken_in_entries_of_255_with_a_zero_top_byte():
    values = torch.zeros(1200, dtype=torch.int16)
    values[[0, 255, 256, 767, 1199]] = torch.tensor([0x0100, 0x0200, 0x0300, 0x0400, 0x7F05], dtype=torch.int16)
    sections, sparse_end = codec.split_residual(values, torch.empty(4000, dtype=torch.uint8))
    # Steps from -1: 1; 255; 1; 511 = 255 + 256 = 255 + 255 + 1; 432 = 255 + 177.
    steps = [1, 255, 1, 255, 255, 1, 255, 177]
    tops = [0x01, 0x02, 0x03, 0, 0, 0x04, 0, 0x7F]
    assert sections[:sparse_end].tolist() == steps + tops
    assert sections[sparse_end:].tolist() == [5 if i == 1199 else 0 for i in range(1200)]
    assert torch.equal(codec.join_residual(sections, torch.empty(1200, dtype=torch.int16)), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_block_the_fine_tune_left_as_it_was_has_no_entries_and_decodes(dtype):
    # A frozen layer: tuned is raw cast to its dtype, so the residual is all zero and the sparse frame is empty.
    raw = torch.randn(64, 48, generator=torch.Generator().manual_seed(5)).half()
    tuned = raw.to(dtype)
    buffer = torch.empty(codec.payload_capacity(tuned.numel(), dtype.itemsize), dtype=torch.uint8)
    payload = bytes(codec.BlockEncoder().encode(tuned, raw, out=buffer))
    first = zstandard.ZstdDecompressor().decompressobj()
    assert first.decompress(payload) == b""  # no steps, no tops
    out = codec.BlockDecoder().decode(payload, raw, torch.empty_like(tuned))
    assert torch.equal(out.view(torch.uint8), tuned.view(torch.uint8))


def test_version_2_bitmaps_are_still_read():
    # As weight-diff 0.3 wrote them: a bitmap (most significant bit first) marking values 0 and 2, then their tops.
    values = torch.tensor([0x1234, 0x00CD, 0xABCD - 0x10000], dtype=torch.int16)
    sections = np.array([0b10100000, 0x12, 0xAB, 0x34, 0xCD, 0xCD], dtype=np.uint8)
    assert torch.equal(codec.join_bitmap_residual(sections, torch.empty(3, dtype=torch.int16)), values)
    wide = torch.tensor([0x12345678, 0x000B0C0D], dtype=torch.int32)
    sections = np.array([0b10000000, 0x12, 0x34, 0x0B, 0x78, 0x56, 0x0D, 0x0C], dtype=np.uint8)
    assert torch.equal(codec.join_bitmap_residual(sections, torch.empty(2, dtype=torch.int32)), wide)
    with pytest.raises(codec.BlockError, match="decodes to 7 bytes, expected 8"):
        codec.join_bitmap_residual(sections[:7], torch.empty(2, dtype=torch.int32))
    with pytest.raises(codec.BlockError, match="past the block's end"):  # a padding bit set
        codec.join_bitmap_residual(np.array([0b10100000, 0x12, 0xAB, 0x34, 0x0B, 0x78, 0x56, 0x0D, 0x0C],
                                            dtype=np.uint8), torch.empty(2, dtype=torch.int32))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_an_incompressible_block_fits_its_payload_buffer_and_decodes_exactly(dtype):
    # Random bits: the second and low bytes are noise, stored in a frame larger than what it holds.
    count = 3 * 2**17 + 5
    bits = torch.randint(-(2**62), 2**62, (count,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    tuned = bits.view(torch.uint8)[: count * dtype.itemsize].view(dtype)
    buffer = torch.empty(codec.payload_capacity(count, dtype.itemsize), dtype=torch.uint8)
    payload = codec.BlockEncoder().encode(tuned, None, out=buffer)
    stored = count * (dtype.itemsize - 1)  # the second frame's content: second and low bytes, not compressed
    assert stored < len(payload) <= buffer.numel()
    out = codec.BlockDecoder().decode(payload, None, torch.empty_like(tuned))
    assert torch.equal(out.view(torch.uint8), tuned.view(torch.uint8))


def test_version_1_byte_planes_are_still_read():
    values = torch.tensor([0x1234, 0xABCD - 0x10000], dtype=torch.int16)
    planes = torch.tensor([0x12, 0xAB, 0x34, 0xCD], dtype=torch.uint8)  # every highest byte, then every low byte
    assert torch.equal(codec.ungroup_bytes(planes, torch.empty(2, dtype=torch.int16)), values)
    wide = torch.tensor([0x12345678, 0x0A0B0C0D], dtype=torch.int32)
    planes = torch.tensor([0x12, 0x0A, 0x34, 0x0B, 0x56, 0x0C, 0x78, 0x0D], dtype=torch.uint8)
    assert torch.equal(codec.ungroup_bytes(planes, torch.empty(2, dtype=torch.int32)), wide)


def _residual(tuned, raw, rows):
    """tuned's bits XOR raw's bits cast to tuned's dtype, for raw's rows; tuned's bits after: plain torch."""
    bits = {2: torch.int16, 4: torch.int32}[tuned.dtype.itemsize]
    residual = tuned.view(bits).clone()
    if raw is not None:
        residual[:rows] ^= raw.to(tuned.dtype).view(bits)
    return residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_block_is_two_plain_zstd_frames_holding_the_documented_sections(compact_pairs, dtype):
    raw, tuned, diff = compact_pairs[dtype]
    raw_tensors, tuned_tensors = plain_tensors(raw), plain_tensors(tuned)
    seen = 0
    for path in sorted(diff.glob("*.wdc")):
        data = path.read_bytes()
        length = struct.unpack("<Q", data[-16:-8])[0]
        for name, entry in json.loads(data[-16 - length : -16])["tensors"].items():
            residual = _residual(tuned_tensors[name], raw_tensors.get(name), entry["raw_rows"])
            width = residual.dtype.itemsize
            for start, stop, offset, size in entry["blocks"]:
                first = zstandard.ZstdDecompressor().decompressobj()
                sparse = first.decompress(data[offset : offset + size])
                dense = zstandard.ZstdDecompressor().decompress(first.unused_data)  # the second and last frame
                values = [int(v) & (1 << 8 * width) - 1 for v in residual[start:stop].reshape(-1).tolist()]
                assert sparse == _steps_and_tops(values, width), (name, start)
                expected = bytes(v >> 8 * (width - 2) & 0xFF for v in values)
                expected += b"".join((v & (1 << 8 * (width - 2)) - 1).to_bytes(width - 2, "little") for v in values)
                assert dense == expected, (name, start)
                seen += 1
    assert seen >= 21


def _steps_and_tops(values, width):
    """Version 3's sparse section of unsigned residual values, in plain Python: a step byte for each value whose
    highest byte is not zero (counted from -1; longer steps in entries of 255 with a zero top), then the tops."""
    steps, tops, previous = [], [], -1
    for i, value in enumerate(values):
        top = value >> 8 * (width - 1)
        if top:
            while i - previous > 255:
                steps.append(255)
                tops.append(0)
                previous += 255
            steps.append(i - previous)
            tops.append(top)
            previous = i
    return bytes(steps + tops)


def _bitmap_and_tops(values, width):
    """Version 2's sparse section, in plain Python: a bitmap (most significant bit first), then the tops."""
    tops = [v >> 8 * (width - 1) for v in values]
    bitmap = bytearray((len(values) + 7) // 8)
    for i, top in enumerate(tops):
        bitmap[i // 8] |= (top != 0) << (7 - i % 8)
    return bytes(bitmap) + bytes(t for t in tops if t)


def _rewrite_as_version_2(diff, raw, tuned):
    """Re-encode every block of ``diff`` in version 2's layout (bitmap instead of steps) with plain Python and
    zstd: a diff as weight-diff 0.3 wrote it."""

    def block(residual, width):
        values = [int(v) & (1 << 8 * width) - 1 for v in residual.reshape(-1).tolist()]
        dense = bytes(v >> 8 * (width - 2) & 0xFF for v in values)
        dense += b"".join((v & (1 << 8 * (width - 2)) - 1).to_bytes(width - 2, "little") for v in values)
        compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
        return compressor.compress(_bitmap_and_tops(values, width)) + compressor.compress(dense)

    _rewrite(diff, raw, tuned, 2, block)


def _rewrite_as_version_1(diff, raw, tuned):
    """Re-encode every .wdc of ``diff`` in version 1's layout (byte planes, highest first), with plain numpy and
    zstd: a diff as weight-diff 0.2.0 wrote it."""

    def block(residual, width):
        planes = residual.reshape(-1).numpy().view(np.uint8).reshape(-1, width)[:, ::-1].T
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(planes.tobytes())

    _rewrite(diff, raw, tuned, 1, block)


def _rewrite(diff, raw, tuned, version, encode):
    """Re-encode every block of every .wdc of ``diff`` with ``encode(residual rows, width)``, mark the files
    ``version`` and update the diff's SHA256SUMS."""
    raw_tensors, tuned_tensors = plain_tensors(raw), plain_tensors(tuned)
    sums = (diff / "SHA256SUMS").read_text()
    for path in sorted(diff.glob("*.wdc")):
        data = path.read_bytes()
        length = struct.unpack("<Q", data[-16:-8])[0]
        index = json.loads(data[-16 - length : -16])
        out = bytearray(b"WDCOMPCT")
        for name, entry in index["tensors"].items():
            residual = _residual(tuned_tensors[name], raw_tensors.get(name), entry["raw_rows"])
            blocks = []
            for start, stop, _, _ in entry["blocks"]:
                payload = encode(residual[start:stop], residual.dtype.itemsize)
                blocks.append([start, stop, len(out), len(payload)])
                out += payload
            entry["blocks"] = blocks
        index["version"] = version
        body = json.dumps(index).encode()
        out += body + struct.pack("<Q8s", len(body), b"WDCOMPCT")
        sums = sums.replace(hashlib.sha256(data).hexdigest(), hashlib.sha256(out).hexdigest())
        path.write_bytes(bytes(out))
    (diff / "SHA256SUMS").write_text(sums)


@pytest.mark.parametrize(("version", "dtype"), [(1, torch.float32), (1, torch.bfloat16), (2, torch.float32),
                                                 (2, torch.bfloat16)], ids=str)  # fmt: skip
def test_a_diff_of_an_earlier_version_still_recovers_bit_for_bit(compact_pairs, copy_dir, version, dtype, tmp_path):
    raw, tuned, diff = compact_pairs[dtype]
    old = copy_dir(diff, f"v{version}")
    {1: _rewrite_as_version_1, 2: _rewrite_as_version_2}[version](old, raw, tuned)
    result = run("recover", "--path_raw", raw, "--path_diff", old, "--path_tuned", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "verified: 21 tensors match the publisher's manifest" in result.output
    assert_bit_identical(plain_tensors(tmp_path / "out"), plain_tensors(tuned))
    checked = run("verify", old)
    assert checked.exit_code == 0, checked.output


def test_inspect_reports_a_compact_diff_and_the_base_it_expects(compact_pairs):
    _, tuned, diff = compact_pairs[torch.bfloat16]
    found = run("inspect", diff, "--json")
    assert found.exit_code == 0, found.output
    body = json.loads(found.output)
    assert body["kind"] == "diff" and body["layout"] == "weight-diff compact" and body["dtypes"] == {"bfloat16": 135616}
    assert body["tensors"] == len(plain_tensors(tuned)) and body["sums"]["status"] == "verified"
    assert "vocab 320), float16" in body["base"]


def test_a_family_rule_is_refused_for_a_compact_diff(compact_pairs, tmp_path):
    raw, tuned, diff = compact_pairs[torch.float16]
    made = run("make-diff", "--format", "compact", "--family", "alpaca", "--path_raw", raw, "--path_tuned", tuned,
               "--path_diff", tmp_path / "d", "--quiet")  # fmt: skip
    assert made.exit_code == 2 and "choose one" in made.output and not (tmp_path / "d").exists()
    recovered = run("recover", "--family", "alpaca", "--path_raw", raw, "--path_diff", diff, "--path_tuned",
                    tmp_path / "o", "--quiet")  # fmt: skip
    assert recovered.exit_code == 2 and "omit --family" in recovered.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("pair", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=str)
def test_the_raw_is_cast_as_torch_casts_directly_for_every_value(pair):
    """The codec's fast cast (through float32) must give the direct cast's bits, or old diffs stop decoding."""
    source, target = pair
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(source)
    finite = every[torch.isfinite(every)]
    for values in (finite, every, every[~torch.isfinite(every)]):
        expected = torch.empty(values.shape, dtype=target)
        expected.copy_(values)  # torch's direct cast, the format's definition
        got = codec.cast_to(values, target, codec.Scratch())
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_nan_and_inf_are_warned_by_compact_make_diff_and_recover_as_by_the_float32_path(build_pair, tmp_path):
    from conftest import load_tensors
    from weight_diff.tiny_llama import save_checkpoint

    raw, tuned = build_pair(tuned_dtype=torch.float16)
    state = load_tensors(tuned)
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("-inf")
    state["model.embed_tokens.weight"][-1, 2] = float("inf")  # an added vocabulary row: stored as it is
    bad = tmp_path / "tuned"
    shutil.copytree(tuned, bad)
    save_checkpoint(state, bad, fmt="safetensors")
    made = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", bad, "--path_diff",
               tmp_path / "diff", "--quiet")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "warning: 3 tensors hold NaN or Inf values (first: model.embed_tokens.weight)" in made.output
    recovered = run("recover", "--path_raw", raw, "--path_diff", tmp_path / "diff", "--path_tuned", tmp_path / "out",
                    "--quiet")  # fmt: skip
    assert recovered.exit_code == 0, recovered.output
    assert "warning: 3 tensors hold NaN or Inf values (first: model.embed_tokens.weight)" in recovered.output
    assert "verified: 21 tensors match the publisher's manifest, NaN/Inf values included" in recovered.output
    assert_bit_identical(plain_tensors(tmp_path / "out"), plain_tensors(bad))
    finite = run("make-diff", "--format", "compact", "--path_raw", raw, "--path_tuned", tuned, "--path_diff",
                 tmp_path / "d2", "--quiet")  # fmt: skip
    assert finite.exit_code == 0 and "warning" not in finite.output, finite.output


@pytest.mark.parametrize(
    "index",
    [b"[" * 100000, b"[]", b'{"format": "weight-diff-compact", "version": NaN}',
     b'{"format": "weight-diff-compact", "version": 3, "codec": {}, "tensors": [1]}'],
    ids=["nested", "list", "nan", "tensors-list"],
)  # fmt: skip
def test_a_damaged_container_index_is_one_clear_refusal(compact_pairs, tmp_path, index):
    from weight_diff.container import ContainerReader
    from weight_diff.errors import IntegrityError

    _, _, diff = compact_pairs[torch.bfloat16]
    data = sorted(diff.glob("*.wdc"))[0].read_bytes()
    length = struct.unpack("<Q", data[-16:-8])[0]
    path = tmp_path / "diff.wdc"
    path.write_bytes(data[: -16 - length] + index + struct.pack("<Q8s", len(index), b"WDCOMPCT"))
    with pytest.raises(IntegrityError, match=r"diff\.wdc: its index is damaged.* \(.*\); download it again$"):
        ContainerReader(path)


def _edit_index(path, edit):
    """Rewrite a .wdc file's index with ``edit(index)`` applied (the payloads stay as they are)."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[-16:-8])[0]
    index = json.loads(data[-16 - length : -16])
    edit(index)
    body = json.dumps(index).encode()
    path.write_bytes(data[: -16 - length] + body + struct.pack("<Q8s", len(body), b"WDCOMPCT"))


UP = "model.layers.0.mlp.up_proj.weight"
INDEX_EDITS = {  # what a damaged or hostile index claims, found by a review: each once ended in a bare error
    "rows-past-the-end": lambda t: t[UP]["blocks"][-1].__setitem__(1, t[UP]["shape"][0] + 2),
    "no-blocks": lambda t: t[UP].__setitem__("blocks", []),
    "huge-rows": lambda t: t[UP]["blocks"][0].__setitem__(1, 10**10),
    "negative-size": lambda t: t[UP]["blocks"][0].__setitem__(3, -5),
    "huge-row-width": lambda t: t.__setitem__("extra", {"dtype": "bfloat16", "shape": [0, 10**12],
                                                        "raw_dtype": None, "raw_rows": 0, "blocks": []}),
    "one-block-of-a-billion-values": lambda t: t.__setitem__("extra", {
        "dtype": "bfloat16", "shape": [2**24, 64], "raw_dtype": None, "raw_rows": 0, "blocks": [[0, 2**24, 8, 9]]}),
    "raw-rows-past-the-end": lambda t: t[UP].__setitem__("raw_rows", t[UP]["shape"][0] + 1),
    "blocks-mix-raw-and-stored-rows": lambda t: t[UP].__setitem__("raw_rows", 1),
}  # fmt: skip


@pytest.mark.parametrize("edit", INDEX_EDITS, ids=str)
def test_an_index_whose_blocks_or_shapes_weight_diff_never_writes_is_named_damaged(
    compact_pairs, copy_dir, tmp_path, edit
):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, edit)
    path = next(p for p in sorted(diff.glob("*.wdc")) if UP.encode() in p.read_bytes()[-100_000:])
    _edit_index(path, lambda index: INDEX_EDITS[edit](index["tensors"]))
    for args in (["recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out"],
                 ["verify", diff]):  # fmt: skip
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert f"{path}: its index is damaged" in result.output and "download it again" in result.output
        assert "Traceback" not in result.output and "unexpected" not in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_index_larger_than_any_weight_diff_writes_is_refused_unread(compact_pairs, copy_dir, tmp_path):
    from weight_diff.container import MAX_INDEX_BYTES

    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, "huge-index")
    path = sorted(diff.glob("*.wdc"))[0]
    with open(path, "r+b") as file:  # a sparse hole, then a trailer that claims it all as the index
        size = len(b"WDCOMPCT") + MAX_INDEX_BYTES + 1
        file.truncate(size)
        file.seek(size)
        file.write(struct.pack("<Q8s", MAX_INDEX_BYTES + 1, b"WDCOMPCT"))
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{path.name}: its index claims {MAX_INDEX_BYTES + 1} bytes, more than weight-diff writes" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", [4, True, "3"], ids=["newer", "bool", "string"])
def test_a_compact_file_of_another_version_asks_for_an_upgrade(compact_pairs, copy_dir, tmp_path, version):
    raw, _, diff = compact_pairs[torch.bfloat16]
    diff = copy_dir(diff, "future")
    path = sorted(diff.glob("*.wdc"))[0]
    data = path.read_bytes()
    length = struct.unpack("<Q", data[-16:-8])[0]
    index = json.loads(data[-16 - length : -16])
    index["version"] = version
    body = json.dumps(index).encode()
    path.write_bytes(data[: -16 - length] + body + struct.pack("<Q8s", len(body), b"WDCOMPCT"))
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{path.name}: compact format version {version}; this weight-diff reads versions 1, 2, 3: upgrade" in (
        result.output
    )
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_output_checksums_cover_every_block_however_slow_the_hashing(compact_pairs, monkeypatch, tmp_path):
    raw, tuned, diff = compact_pairs[torch.float32]
    real = hashlib.sha256

    class SlowSha256:  # the file hash lane falls behind the writes
        def __init__(self, data=b""):
            self._hash = real(data)

        def update(self, data):
            time.sleep(0.01)
            self._hash.update(data)

        def hexdigest(self):
            return self._hash.hexdigest()

    monkeypatch.setattr(compact.hashlib, "sha256", SlowSha256)
    recover(raw, diff, tmp_path / "out", max_shard_size="150KB")
    monkeypatch.setattr(compact.hashlib, "sha256", real)
    sums = dict(line.split("  ")[::-1] for line in (tmp_path / "out" / "SHA256SUMS").read_text().splitlines())
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) >= 2
    for shard in shards:
        assert sums[shard.name] == real(shard.read_bytes()).hexdigest(), shard.name
    assert_bit_identical(plain_tensors(tmp_path / "out"), plain_tensors(tuned))


def test_a_compact_diff_given_where_a_model_is_read_says_what_it_is(compact_pairs, tmp_path):
    raw, tuned, diff = compact_pairs[torch.bfloat16]
    for args in (["compare", diff, tuned], ["make-diff", "--path_raw", raw, "--path_tuned", diff, "--path_diff",
                                             tmp_path / "out"]):  # fmt: skip
        result = run(*args)
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert f"{diff}: a compact weight-diff diff (.wdc files)" in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_resume_refuses_a_compact_diff_replaced_since_the_interruption(compact_pairs, tmp_path):
    raw, tuned, published = compact_pairs[torch.bfloat16]
    diff = tmp_path / "diff"
    shutil.copytree(published, diff)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(raw, diff, out, max_shard_size="60KB", progress=interrupt_after(150_000))
    assert (out / output.JOURNAL_NAME).is_file()
    retuned = tmp_path / "retuned"  # the publisher's next version of the fine-tune: one tensor moved on
    shutil.copytree(tuned, retuned)
    weights = plain_tensors(retuned)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, retuned / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(diff)  # downloaded over the first into the same folder
    make_diff(raw, retuned, diff, diff_format="compact", max_shard_size="150KB")
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--max-shard-size",
                 "60KB", "--resume")  # fmt: skip
    assert result.exit_code == 2 and "used other inputs" in result.output, result.output
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("files", [5, None, [["x"]], [], "diff-00001-of-00002.wdc", ["../x.wdc"], ["a.wdc", "a.wdc"]])
def test_a_manifest_whose_file_list_is_not_one_is_one_clear_refusal(compact_pairs, copy_dir, tmp_path, files):
    raw, _, diff = compact_pairs[torch.float32]
    damaged = copy_dir(diff)
    manifest = json.loads((damaged / "weight-diff-manifest.json").read_text())
    manifest["rules"]["files"] = files
    (damaged / "weight-diff-manifest.json").write_text(json.dumps(manifest))
    for args in (["recover", "--path_raw", raw, "--path_diff", damaged, "--path_tuned", tmp_path / "out"],
                 ["verify", damaged]):  # fmt: skip
        result = run(*args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert "rules.files must list the diff's .wdc file names" in result.output, result.output
    assert not (tmp_path / "out").exists()
