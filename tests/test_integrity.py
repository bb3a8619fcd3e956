"""The manifest is checked from the first tensor to the last; SHA256SUMS and `verify` catch damaged copies."""

import shutil
import subprocess

import pytest
from click.testing import CliRunner

from conftest import snapshot
from weight_diff.checkpoint import Checkpoint
from weight_diff.cli import main
from weight_diff.errors import IntegrityError
from weight_diff.jobs import recover


def flip_byte_inside(directory, tensor):
    """Flip a bit in the top byte of a value mid-tensor; return the file it was in.

    A flip in the lowest mantissa bits of a diff value can vanish when raw + diff is rounded to float32: that
    recovery is still exactly the publisher's, so the test damages a byte that matters.
    """
    with Checkpoint.open(directory) as checkpoint:
        info = checkpoint.tensors[tensor]
    with info.file.open("r+b") as file:
        middle = info.nbytes // 2 // info.dtype.itemsize * info.dtype.itemsize
        file.seek(info.offset + middle + info.dtype.itemsize - 1)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0x10]))
    return info.file


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_a_flipped_byte_in_a_diff_shard_fails_recover_naming_tensor_and_file(pair, made_diff, copy_dir, tmp_path):
    raw, _ = pair
    diff = copy_dir(made_diff)
    damaged = flip_byte_inside(diff, "model.layers.1.mlp.up_proj.weight")
    before = snapshot(diff)
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out", "--quiet")
    assert result.exit_code == 1
    assert f"diff tensor model.layers.1.mlp.up_proj.weight (in {damaged}) is damaged" in result.output
    assert f"Download {damaged.name} again" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    assert snapshot(diff) == before


def test_a_raw_model_from_another_seed_is_refused_at_the_first_tensor(build_pair, made_diff, tmp_path):
    other_raw, _ = build_pair(seed=7)
    plans = []
    with pytest.raises(IntegrityError, match=r"differs from the one the diff was made against") as error:
        recover(other_raw, made_diff, tmp_path / "out", max_shard_size="100KB", on_plan=plans.append)
    first = plans[0].jobs[0]
    assert len(plans[0].shards) > 1
    assert str(error.value).startswith(f"raw tensor {first.name} (in {first.raw.file})")
    assert not (tmp_path / "out").exists()  # stopped in shard one: the directory it made is gone with it


def test_a_raw_model_in_another_precision_is_refused_before_any_write(build_pair, made_diff, tmp_path):
    import torch

    bf16_raw, _ = build_pair(raw_dtype=torch.bfloat16)
    with pytest.raises(IntegrityError, match="is bfloat16 .* the diff was made against float16"):
        recover(bf16_raw, made_diff, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_verify_passes_on_a_recovered_model_and_fails_on_a_flipped_byte(pair, made_diff, tmp_path):
    raw, _ = pair
    out = tmp_path / "out"
    recover(raw, made_diff, out)
    ok = run("verify", out, "--diff", made_diff)
    assert ok.exit_code == 0 and "files and tensors in" in ok.output
    files_only = run("verify", out)  # no tensor is checked without a diff: the line says files
    assert files_only.exit_code == 0 and f"files in {out} match" in files_only.output, files_only.output
    flip_byte_inside(out, "model.norm.weight")
    bad = run("verify", out, "--diff", made_diff)
    assert bad.exit_code == 1
    assert "MISMATCH model.safetensors: content changed" in bad.output
    assert "MISMATCH model.norm.weight (model.safetensors)" in bad.output
    assert "do not match; recover it again into a new directory" in bad.output  # what to do


def test_verify_on_a_diff_checks_its_tensors_against_its_manifest(made_diff, copy_dir):
    assert run("verify", made_diff).exit_code == 0
    diff = copy_dir(made_diff)
    flip_byte_inside(diff, "lm_head.weight")
    result = run("verify", diff)
    assert result.exit_code == 1 and "MISMATCH lm_head.weight" in result.output


def test_a_legacy_diff_without_manifest_recovers_with_correct_sha256sums_and_no_claim(pair, original, tmp_path):
    raw, tuned = pair
    diff = original.make_diff(raw, tuned, tmp_path / "diff-2023", added_rows="mean", fmt="bin", shards=2)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "not verified: the diff has no manifest" in result.output
    assert "verified:" not in result.output.replace("not verified:", "")
    listed = (out / "SHA256SUMS").read_text()
    assert "config.json" in listed and "model.safetensors" in listed and "tokenizer.json" in listed
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_sha256sums_of_a_manifest_checked_recovery_hash_every_shard_as_written(pair, made_diff, tmp_path, dtype):
    """Each listed digest is the file's, computed here by hashlib, whether the written bytes are the ones hashed
    for the manifest (float32) or a cast of them (--dtype)."""
    import hashlib

    raw, _ = pair
    out = tmp_path / "out"
    report = recover(raw, made_diff, out, dtype=dtype, max_shard_size="100KB")
    assert report.verified and report.shards > 2
    listed = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert len(list(out.glob("*.safetensors"))) == report.shards
    for path in out.iterdir():
        if path.name != "SHA256SUMS":
            assert listed[path.name] == hashlib.sha256(path.read_bytes()).hexdigest(), path.name


def test_a_diff_whose_tensors_differ_from_its_manifest_is_refused(pair, made_diff, copy_dir, tmp_path):
    import json

    raw, _ = pair
    diff = copy_dir(made_diff)
    manifest_path = diff / "weight-diff-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["tensors"]["lm_head.weight"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"weight-diff-manifest\.json: differs from the diff's checksums"):
        recover(raw, diff, tmp_path / "out")  # the manifest is in SHA256SUMS: an edit is caught before planning
    (diff / "SHA256SUMS").unlink()
    with pytest.raises(IntegrityError, match="the diff's tensors differ from its manifest"):
        recover(raw, diff, tmp_path / "out")


def test_the_recovery_record_says_whether_the_model_was_verified(pair, made_diff, legacy_diff, tmp_path):
    import json

    raw, _ = pair
    recover(raw, made_diff, tmp_path / "checked")
    recover(raw, legacy_diff, tmp_path / "unchecked")
    checked = json.loads((tmp_path / "checked" / "weight-diff-recovery.json").read_text())
    unchecked = json.loads((tmp_path / "unchecked" / "weight-diff-recovery.json").read_text())
    assert checked["verified"] is True and checked["tensors"] == 21 and len(checked["diff_manifest_sha256"]) == 64
    assert unchecked["verified"] is False and unchecked["diff_manifest_sha256"] is None
    assert "weight-diff-recovery.json" in (tmp_path / "checked" / "SHA256SUMS").read_text()
    unchecked_text = run("inspect", tmp_path / "unchecked").output
    assert "not verified (the diff had no manifest)" in unchecked_text


def test_verify_refuses_a_diff_that_cannot_vouch_for_the_model_and_a_diff_given_as_the_model(pair, made_diff, tmp_path):
    """Each of these once ended 'verified', exit 0 (found by a review)."""
    raw, _ = pair
    out = tmp_path / "out"
    recover(raw, made_diff, out)
    (tmp_path / "a-file").write_text("x")
    cases = {
        tmp_path / "nowhere": "no such directory",
        tmp_path / "a-file": "not a directory",
        raw: "has no weight-diff-manifest.json, so nothing vouches for the model's tensors",
        out: "has no weight-diff-manifest.json",
    }
    for given, message in cases.items():
        result = run("verify", out, "--diff", given)
        assert result.exit_code == 2 and message in result.output and "verified" not in result.output, result.output
    swapped = run("verify", made_diff, "--diff", out)
    assert swapped.exit_code == 2 and "a weight diff, not a recovered model" in swapped.output, swapped.output
    assert run("verify", out, "--diff", made_diff).exit_code == 0


def test_verify_and_inspect_of_an_interrupted_output_say_to_finish_it(pair, made_diff, tmp_path):
    from conftest import interrupt_after

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(pair[0], made_diff, out, max_shard_size="100KB", progress=interrupt_after(300_000))
    for command in ("verify", "inspect"):
        result = run(command, out)
        assert result.exit_code == 2 and "an unfinished weight-diff run (interrupted)" in result.output
        assert "--resume" in result.output


def test_a_diff_file_downloaded_again_after_damage_lets_resume_finish(pair, made_diff, copy_dir, tmp_path):
    # A damaged diff tensor stops the run with its finished shards kept. Once the file is downloaded again (a new
    # modification time) --resume was refused ("used other inputs"): every tensor is checked against the same
    # manifest, which now names the inputs.
    raw, _ = pair
    reference = tmp_path / "reference"
    recover(raw, made_diff, reference, max_shard_size="100KB")
    diff = copy_dir(made_diff, "models--org--diff")  # "--" in a path, as in a hub cache's, is no option
    damaged = flip_byte_inside(diff, "model.norm.weight")  # in the diff's last shard
    out = tmp_path / "out"
    args = ["recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--max-shard-size", "100KB", "-q"]
    stopped = run(*args)
    assert stopped.exit_code == 1 and "model.norm.weight" in stopped.output, stopped.output
    assert "the shards finished before were kept" in stopped.output and "--resume" in stopped.output
    assert list(out.glob("model-*.safetensors"))
    damaged.write_bytes((made_diff / damaged.name).read_bytes())  # downloaded again
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0 and "verified" in resumed.output, resumed.output
    shards = sorted(path.name for path in reference.glob("model-*.safetensors"))
    assert sorted(path.name for path in out.glob("model-*.safetensors")) == shards
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in shards)
