"""Each published diff family: a tiny diff made the way its publisher made it, recovered by us, and compared with
what the family's own script computes, written here with plain torch on whole tensors (not the pipeline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import interrupt_after, load_tensors
from weight_diff import families
from weight_diff.arithmetic import torch_row_mean
from weight_diff.cli import main
from weight_diff.errors import IntegrityError, PlanError, UsageError
from weight_diff.jobs import recover
from weight_diff.tiny_llama import make_raw_and_tuned, save_checkpoint

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB = (EMBED, HEAD)


def _grow(raw: dict[str, torch.Tensor], rows: int, fill) -> dict[str, torch.Tensor]:
    """raw with embed/lm_head grown by ``rows`` rows made by ``fill(old_rows)`` (whole tensors)."""
    grown = dict(raw)
    for name in VOCAB:
        old = raw[name]
        grown[name] = torch.cat([old, fill(old).expand(rows, -1)], dim=0)
    return grown


def _write_diff(directory: Path, weights: dict, tuned_dir: Path, *, fmt="bin", pad: str | None = None) -> Path:
    """A diff directory: ``weights`` plus the tuned model's config and tokenizer files (as save_pretrained did)."""
    directory.mkdir(parents=True)
    for path in tuned_dir.iterdir():
        if path.is_file() and not path.name.startswith(("model", "pytorch_model")):
            shutil.copy(path, directory / path.name)
    if pad is not None:
        (directory / "added_tokens.json").write_text(json.dumps({pad: 320}))
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["pad_token"] = pad
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    save_checkpoint(weights, directory, fmt=fmt)
    return directory


@pytest.fixture(scope="module")
def fp32_case(tmp_path_factory):
    """Alpaca's make_diff: raw (fp16 on disk) and tuned loaded in float32, raw grown by torch's float32 mean."""
    work = tmp_path_factory.mktemp("fp32")
    raw_dir, tuned_dir = make_raw_and_tuned(work)
    raw = {n: t.float() for n, t in load_tensors(raw_dir).items()}
    tuned = load_tensors(tuned_dir)
    grown = _grow(raw, 1, lambda old: old.mean(dim=0, keepdim=True))
    diff = {n: tuned[n] - grown[n] for n in tuned}
    # Alpaca's recover: diff.add_(raw) in float32, raw grown the same way
    expected = {n: diff[n] + grown[n] for n in diff}
    return work, raw_dir, tuned_dir, diff, expected


def _check_equal(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_tensors(out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _alpaca_sum(expected: dict[str, torch.Tensor], config: dict, raw_dtype=torch.float16) -> float:
    """Alpaca's check, as its script computed it under transformers 4.28: every state-dict tensor's float32 sum,
    in state-dict order, rotary inv_freq (stored in raw's dtype by the 2023 conversion) after each o_proj."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv = (1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(raw_dtype).float()
    order = [EMBED]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        order += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"] + [p + "inv_freq"]
        order += [p + f"mlp.{x}_proj.weight" for x in ("gate", "down", "up")]
        order += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    order += ["model.norm.weight", HEAD]
    state = {**expected, **{n: inv for n in order if n.endswith("inv_freq")}}
    return sum(state[n].sum() for n in order).item()


def test_torch_row_mean_equals_torch_on_the_whole_tensor():
    rows = (torch.randn(3001, 192) * 0.02).half()
    want = rows.float().mean(dim=0, keepdim=True)
    got = torch_row_mean(lambda a, b: rows[a:b], rows=3001, width=192, budget=64 * 3001, rows_per_read=233)
    assert torch.equal(got, want)  # three bands of 64 columns, row blocks of 233: every bit as torch's own


def test_alpaca_recovers_as_its_script_and_fails_its_hardcoded_sum_on_another_model(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "alpaca-diff", diff, tuned_dir, pad="[PAD]")
    with pytest.raises(IntegrityError, match=r"Alpaca's hard-coded sum is 50637\.1836 .*--family wizardlm"):
        recover(raw_dir, diff_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()  # nothing that loads as a model
    # The sum is taken once every shard is written: none of them is kept for --resume to finish unchecked.
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="nothing to resume"):
        recover(raw_dir, diff_dir, tmp_path / "out", resume=True)


def test_alpaca_sum_passes_when_it_is_the_models_sum_with_inv_freq(fp32_case, tmp_path, monkeypatch):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "alpaca-diff", diff, tuned_dir, pad="[PAD]")
    config = json.loads((diff_dir / "config.json").read_text())
    monkeypatch.setattr(families, "ALPACA_7B_SUM", _alpaca_sum(expected, config))
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "alpaca" and "[PAD]" in report.family_reason
    assert report.checks and "passed" in report.checks[0] and "inv_freq" in report.checks[0]
    _check_equal(tmp_path / "out", expected)
    # without the inv_freq buffers the 2023 sum would not be met: the check depends on them
    no_inv = sum(t.sum() for t in expected.values()).item()
    assert abs(no_inv - families.ALPACA_7B_SUM) > families.ALPACA_SUM_ATOL


def test_wizardlm_is_alpacas_rule_without_the_sum(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "wizard-diff", diff, tuned_dir, pad="[PAD]")
    report = recover(raw_dir, diff_dir, tmp_path / "out", family="wizardlm")
    assert report.family == "wizardlm" and report.family_reason == "chosen with --family" and not report.checks
    _check_equal(tmp_path / "out", expected)


def test_resume_under_another_family_is_refused_and_under_the_same_gives_the_rule_s_model(fp32_case, tmp_path):
    """Two rules that write the same dtypes but fill added rows differently (weight-diff: the exact mean of raw's
    rows, float64, wizardlm: torch's float32 mean): shards written by one must not be completed by the other."""
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "wizard-diff", diff, tuned_dir, pad="[PAD]")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(raw_dir, diff_dir, out, family="wizardlm", max_shard_size="100KB", progress=interrupt_after(300_000))
    with pytest.raises(UsageError, match="other inputs or options"):
        recover(raw_dir, diff_dir, out, family="weight-diff", max_shard_size="100KB", resume=True)
    report = recover(raw_dir, diff_dir, out, family="wizardlm", max_shard_size="100KB", resume=True)
    assert report.resumed_shards >= 1
    _check_equal(out, expected)


def test_open_instruct_is_detected_from_its_pad_token(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "oi-diff", diff, tuned_dir, pad="<pad>")
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "open-instruct" and not report.checks
    _check_equal(tmp_path / "out", expected)


def test_a_diff_that_fits_two_families_is_refused_with_the_candidates(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "unnamed", diff, tuned_dir)
    (diff_dir / "added_tokens.json").unlink(missing_ok=True)
    for name in ("special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        (diff_dir / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match=r"several families: open-instruct .*alpaca .*--family NAME"):
        recover(raw_dir, diff_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alpaca_farm_checks_model_sum_txt(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "farm-diff", diff, tuned_dir, pad="[PAD]")
    config = json.loads((diff_dir / "config.json").read_text())
    good = _alpaca_sum(expected, config)
    (diff_dir / "model_sum.txt").write_text(f"{good + 1.0}\n")  # off by more than numpy.isclose allows
    with pytest.raises(IntegrityError, match="model_sum.txt"):
        recover(raw_dir, diff_dir, tmp_path / "bad")
    (diff_dir / "model_sum.txt").write_text(f"{good}\n")
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "alpaca-farm" and "model_sum.txt passed" in report.checks[0]
    _check_equal(tmp_path / "out", expected)


def test_alpaca_farm_keeps_tensors_raw_lacks_or_of_another_size_as_stored(fp32_case, tmp_path):
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    head = torch.randn(1, 64)  # a reward model's score head: no raw counterpart, stored absolute
    norm = torch.randn(65) * 0.01  # a size raw does not have: stored absolute ("not diff'd in the upload")
    norm_name = "model.layers.0.input_layernorm.weight"
    weights = {**diff, "score.weight": head, norm_name: norm}
    diff_dir = _write_diff(tmp_path / "farm-diff", weights, tuned_dir, pad="[PAD]")
    want = {**expected, "score.weight": head, norm_name: norm}
    config = json.loads((diff_dir / "config.json").read_text())
    (diff_dir / "model_sum.txt").write_text(f"{_alpaca_sum(want, config) + head.sum().item()}\n")
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "alpaca-farm" and "passed" in report.checks[0]
    _check_equal(tmp_path / "out", want)


@pytest.fixture(scope="module")
def fp16_pair(tmp_path_factory):
    """A raw LLaMA (fp16) and float16 fine-tunes of it: same vocabulary, one [PAD] row, and 3 extra rows."""
    work = tmp_path_factory.mktemp("fp16")
    raw_dir, tuned_dir = make_raw_and_tuned(work, add_pad=False, tuned_dtype=torch.float16)
    raw = load_tensors(raw_dir)
    generator = torch.Generator().manual_seed(7)  # a fine-tune that moved weights by more than an fp16 ulp
    tuned = {n: (t.float() + torch.randn(t.shape, generator=generator) * 0.01).half() for n, t in raw.items()}
    return raw_dir, tuned_dir, raw, tuned


def test_vicuna_v11_adds_in_float16_like_fastchat(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    delta = {n: tuned[n] - raw[n] for n in tuned}  # FastChat make_delta: float16 subtraction
    diff_dir = _write_diff(tmp_path / "vicuna", delta, tuned_dir)
    expected = {n: raw[n] + delta[n] for n in delta}  # apply_delta: base (fp16) += delta (fp16)
    assert any(not torch.equal(expected[n], tuned[n]) for n in tuned)  # fp16 does not round-trip: the script is
    report = recover(raw_dir, diff_dir, tmp_path / "out")  # the reference, not the tuned model
    assert report.family == "vicuna-v1.1"
    _check_equal(tmp_path / "out", expected)


def test_vicuna_v11_refuses_added_rows_it_never_adds(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    delta = _grow({n: tuned[n] - raw[n] for n in tuned}, 1, lambda old: torch.zeros_like(old[:1]))
    diff_dir = _write_diff(tmp_path / "vicuna", delta, tuned_dir)
    with pytest.raises(PlanError, match="1 vocabulary rows more than raw.*--family"):
        recover(raw_dir, diff_dir, tmp_path / "out", family="vicuna-v1.1")


def test_vicuna_v0_grows_raw_with_zero_rows(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    target = _grow(tuned, 1, lambda old: (torch.randn(1, old.shape[1]) * 0.02).half())
    base = _grow(raw, 1, lambda old: torch.zeros_like(old[:1]))
    delta = {n: target[n] - base[n] for n in target}
    delta[EMBED][-1, 0] = -0.0  # 0 + -0 is +0 in the script's float16 add: so it must be here
    diff_dir = _write_diff(tmp_path / "vicuna0", delta, tuned_dir, pad="[PAD]")
    expected = {n: base[n] + delta[n] for n in delta}
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "vicuna-v0"
    _check_equal(tmp_path / "out", expected)
    assert torch.equal(
        load_tensors(tmp_path / "out")[EMBED][-1, :1].view(torch.int16), torch.zeros(1, dtype=torch.int16)
    )


def test_llava_adds_raw_to_the_top_left_block_and_keeps_the_projector(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    target = _grow(tuned, 3, lambda old: (torch.randn(1, old.shape[1]) * 0.02).half())
    delta = {}
    for name, tensor in target.items():
        delta[name] = tensor.clone()
        rows = raw[name].shape[0] if raw[name].dim() else 1
        delta[name][:rows] -= raw[name]  # LLaVA make_delta: only raw's block is a difference
    delta["model.mm_projector.weight"] = (torch.randn(64, 32) * 0.02).half()
    delta["model.mm_projector.bias"] = torch.zeros(64).half()
    diff_dir = _write_diff(tmp_path / "llava", delta, tuned_dir)
    expected = {n: t.clone() for n, t in delta.items()}
    for name, tensor in raw.items():
        expected[name][: tensor.shape[0]] += tensor  # apply_delta: param.data[:rows, :cols] += base
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "llava-v0" and "mm_projector" in report.family_reason
    _check_equal(tmp_path / "out", expected)


def test_ziya_takes_embeddings_and_lm_head_as_stored(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    target = _grow(tuned, 40, lambda old: (torch.randn(1, old.shape[1]) * 0.02).half())  # Ziya's larger vocab
    delta = {n: t if n in VOCAB else t - raw[n] for n, t in target.items()}
    diff_dir = _write_diff(tmp_path / "ziya", delta, tuned_dir)
    expected = {n: t if n in VOCAB else t + raw[n] for n, t in delta.items()}
    report = recover(raw_dir, diff_dir, tmp_path / "out")
    assert report.family == "ziya"
    _check_equal(tmp_path / "out", expected)


def test_cli_names_the_family_and_refuses_an_unknown_one(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    delta = {n: tuned[n] - raw[n] for n in tuned}
    diff_dir = _write_diff(tmp_path / "vicuna", delta, tuned_dir)
    args = ["recover", "--path_raw", str(raw_dir), "--path_diff", str(diff_dir)]
    result = CliRunner().invoke(main, [*args, "--path_tuned", str(tmp_path / "a"), "--family", "alpacca"])
    assert result.exit_code == 2 and "--family alpacca: unknown; choose one of" in result.output
    result = CliRunner().invoke(main, [*args, "--path_tuned", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    assert "family: vicuna-v1.1 (float16 delta, same vocabulary as raw" in result.output
    result = CliRunner().invoke(main, ["inspect", str(diff_dir), "--no-hash"])
    assert "family" in result.output and "vicuna-v1.1" in result.output


def test_make_diff_family_vicuna_makes_a_float16_delta_recover_detects(fp16_pair, tmp_path):
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    tuned_copy = tmp_path / "tuned"
    shutil.copytree(tuned_dir, tuned_copy)
    save_checkpoint(tuned, tuned_copy, fmt="safetensors")
    args = ["make-diff", "--path_raw", str(raw_dir), "--path_tuned", str(tuned_copy), "-q"]
    result = CliRunner().invoke(main, [*args, "--path_diff", str(tmp_path / "delta"), "--family", "vicuna-v1.1"])
    assert result.exit_code == 0, result.output
    assert "family: vicuna-v1.1" in result.output
    delta = load_tensors(tmp_path / "delta")
    for name, tensor in tuned.items():  # FastChat make_delta: target (fp16) -= base (fp16)
        assert delta[name].dtype == torch.float16 and torch.equal(delta[name], tensor - raw[name]), name
    assert not (tmp_path / "delta" / "weight-diff-manifest.json").exists()
    report = recover(raw_dir, tmp_path / "delta", tmp_path / "out")
    assert report.family == "vicuna-v1.1"
    _check_equal(tmp_path / "out", {n: raw[n] + delta[n] for n in delta})
    refused = CliRunner().invoke(main, [*args, "--path_diff", str(tmp_path / "z"), "--family", "ziya"])
    assert refused.exit_code == 2 and "make-diff --family ziya: not supported" in refused.output


def test_small_blocks_give_the_same_bits(fp32_case, fp16_pair, tmp_path, monkeypatch):
    from weight_diff import pipeline

    monkeypatch.setattr(pipeline, "BLOCK_ELEMENTS", 1000)  # many blocks per tensor, mean read in 15-row pieces
    work, raw_dir, tuned_dir, diff, expected = fp32_case
    diff_dir = _write_diff(tmp_path / "wizard", diff, tuned_dir, pad="[PAD]")
    recover(raw_dir, diff_dir, tmp_path / "out32", family="wizardlm")
    _check_equal(tmp_path / "out32", expected)
    raw_dir, tuned_dir, raw, tuned = fp16_pair
    target = _grow(tuned, 3, lambda old: (torch.randn(1, old.shape[1]) * 0.02).half())
    base = _grow(raw, 3, lambda old: torch.zeros_like(old[:1]))
    delta = {n: target[n] - base[n] for n in target}
    diff_dir = _write_diff(tmp_path / "vicuna0", delta, tuned_dir, pad="[PAD]")
    recover(raw_dir, diff_dir, tmp_path / "out16", family="vicuna-v0")
    _check_equal(tmp_path / "out16", {n: base[n] + delta[n] for n in delta})


def test_a_family_that_stores_embeddings_whole_forced_on_a_diff_of_them_is_refused(pair, legacy_diff, tmp_path):
    # --family ziya copies embed_tokens and lm_head as stored: on a diff that holds their differences it wrote a
    # broken model and said every plausibility check passed.
    out = tmp_path / "out"
    args = ["recover", "--path_raw", pair[0], "--path_diff", legacy_diff, "--path_tuned", out, "--family", "ziya"]
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "takes model.embed_tokens.weight as stored whole" in result.output or "lm_head.weight as stored whole" in (
        result.output
    ), result.output
    assert "does not follow that family's rule" in result.output and "--family" in result.output
    assert not out.exists() or not any(out.iterdir())
