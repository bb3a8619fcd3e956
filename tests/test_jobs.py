"""make-diff then recover gives back the fine-tune; a 2023 diff recovers to what the 2023 script gives."""

import json
import stat

import pytest
import torch

from conftest import load_tensors, snapshot
from weight_diff.jobs import make_diff, recover

LAYOUTS = [
    dict(raw_fmt="safetensors", raw_shards=1, tuned_fmt="safetensors", tuned_shards=1),
    dict(raw_fmt="bin", raw_shards=2, tuned_fmt="safetensors", tuned_shards=3, inv_freq=True),
    dict(raw_fmt="safetensors", raw_shards=3, tuned_fmt="bin", tuned_shards=1),
    dict(raw_fmt="bin", raw_shards=1, tuned_fmt="bin", tuned_shards=2, inv_freq=True),
]


@pytest.mark.parametrize(
    "layout",
    LAYOUTS,
    ids=lambda layout: f"{layout['raw_fmt']}x{layout['raw_shards']}-{layout['tuned_fmt']}x{layout['tuned_shards']}",
)
def test_make_diff_then_recover_gives_back_the_fine_tune(build_pair, tmp_path, layout):
    raw, tuned = build_pair(**layout)
    before = snapshot(raw) | {f"tuned/{k}": v for k, v in snapshot(tuned).items()}
    made = make_diff(raw, tuned, tmp_path / "diff", max_shard_size="200KB")
    assert made.shards > 1 and made.manifest
    report = recover(raw, tmp_path / "diff", tmp_path / "out")
    assert report.verified and report.tensors == 21

    recovered, expected = load_tensors(tmp_path / "out"), load_tensors(tuned)
    assert set(recovered) == set(expected)
    for name, tensor in expected.items():
        assert recovered[name].dtype == torch.float32
        torch.testing.assert_close(recovered[name], tensor.float(), rtol=0, atol=1e-6)
    assert recovered["lm_head.weight"].shape == (321, 64)
    assert before == snapshot(raw) | {f"tuned/{k}": v for k, v in snapshot(tuned).items()}  # inputs only read


def test_diff_directory_holds_weights_manifest_and_the_tuned_models_files(made_diff, pair):
    names = {path.name for path in made_diff.iterdir()}
    assert {
        "weight-diff-manifest.json",
        "SHA256SUMS",
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
    } <= names
    assert not any(name.endswith((".bin", ".partial")) for name in names)
    config = json.loads((made_diff / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"], config["vocab_size"]) == ("float32", "float32", 321)
    manifest = json.loads((made_diff / "weight-diff-manifest.json").read_text())
    assert manifest["format"] == "weight-diff-manifest" and manifest["version"] == 1
    assert manifest["rules"]["raw_vocab_size"] == 320 and manifest["rules"]["tuned_vocab_size"] == 321
    record = manifest["tensors"]["lm_head.weight"]
    assert record["raw"]["dtype"] == "float16" and record["raw"]["shape"] == [320, 64]
    assert record["diff"]["dtype"] == "float32" and record["result"]["shape"] == [321, 64]
    assert {"weight_diff", "torch", "safetensors"} <= set(manifest["tool"])


def test_recovered_directory_is_hugging_face_format_and_loads_in_transformers(pair, made_diff, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw, tuned = pair
    recover(raw, made_diff, tmp_path / "out", max_shard_size="300KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in load_tensors(out).values())
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert not list(out.glob("*.bin")) and not list(out.glob(".*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 321 and tokenizer.pad_token == "<pad>"
    reference = AutoModelForCausalLM.from_pretrained(tuned)
    inputs = tokenizer("the model", return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_is_cast_after_float32_arithmetic(pair, made_diff, tmp_path, dtype):
    raw, tuned = pair
    name = str(dtype).removeprefix("torch.")
    recover(raw, made_diff, tmp_path / "out", dtype=name)
    recovered = load_tensors(tmp_path / "out")
    expected = load_tensors(tuned)
    for key, tensor in expected.items():
        assert recovered[key].dtype == dtype
        assert torch.equal(recovered[key], tensor.to(dtype)) or torch.allclose(
            recovered[key].float(), tensor, rtol=0, atol=float(torch.finfo(dtype).eps) * 8
        )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == name and config["torch_dtype"] == name


@pytest.mark.parametrize("raw_fmt", ["bin", "safetensors"])
def test_a_2023_diff_recovers_to_what_the_2023_script_gives(build_pair, original, tmp_path, raw_fmt):
    raw, tuned = build_pair(raw_fmt=raw_fmt, raw_shards=2, inv_freq=raw_fmt == "bin")
    diff = original.make_diff(raw, tuned, tmp_path / "diff-2023", added_rows="mean", fmt="bin", shards=2)
    original.recover(raw, diff, tmp_path / "by-2023-script")
    report = recover(raw, diff, tmp_path / "ours")
    assert not report.manifest and not report.verified

    ours, theirs = load_tensors(tmp_path / "ours"), load_tensors(tmp_path / "by-2023-script")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[name][:320], tensor[:320])  # every raw row: bit-identical
            torch.testing.assert_close(ours[name][320:], tensor[320:], rtol=1e-6, atol=1e-7)  # mean rounding
        else:
            assert torch.equal(ours[name], tensor), name


def test_an_open_instruct_diff_with_random_pad_rows_recovers_every_other_value(build_pair, original, tmp_path):
    raw, tuned = build_pair()
    diff = original.make_diff(raw, tuned, tmp_path / "diff-oi", added_rows="random", fmt="bin")
    recover(raw, diff, tmp_path / "ours")
    ours, expected = load_tensors(tmp_path / "ours"), load_tensors(tuned)
    for name, tensor in expected.items():
        rows = 320 if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor.shape[0]
        torch.testing.assert_close(ours[name][:rows], tensor[:rows], rtol=0, atol=1e-6)
    # The pad row was made against a random row nobody can reproduce: it differs, as with the 2023 script.
    assert not torch.allclose(ours["lm_head.weight"][320], expected["lm_head.weight"][320], atol=1e-4)
