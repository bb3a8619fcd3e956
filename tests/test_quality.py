"""The layer-streamed perplexity agrees with transformers; trained tiny LLaMAs tell a right base from a wrong one."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from weight_diff.cli import main
from weight_diff.errors import PlausibilityError
from weight_diff.jobs import recover
from weight_diff.quality import QUALITY_TEXT, check_quality, perplexity, tokenize


def test_layer_streamed_perplexity_equals_transformers_llama(trained):
    from transformers import LlamaForCausalLM

    ids = tokenize(trained.tuned, QUALITY_TEXT)
    assert len(ids) > 100 and ids[0] == 1  # BOS, then the text
    for model_dir in (trained.raw, trained.tuned):
        reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            loss = reference(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
        assert math.isclose(perplexity(model_dir, ids), math.exp(loss), rel_tol=1e-4)


def test_perplexity_runs_grouped_query_attention_and_tied_embeddings_like_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    from weight_diff.tiny_llama import build_tokenizer, save_model_dir, tiny_config

    config = tiny_config(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500.0)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_model_dir(tmp_path, state_dict=state, config=config, tokenizer=build_tokenizer(320), dtype=torch.float32)
    ids = list(range(1, 200, 3))
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert math.isclose(perplexity(tmp_path, ids), math.exp(loss), rel_tol=1e-4)


def test_right_base_passes_every_check_and_keeps_its_perplexity(trained, tmp_path):
    out = tmp_path / "right"
    args = ["--path_raw", trained.raw, "--path_diff", trained.diff, "--path_tuned", out, "--check-quality", "-q"]
    result = CliRunner().invoke(main, ["recover", *map(str, args)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("not verified: the diff has no manifest, but every plausibility check passed")
    assert "config, precision, grid, magnitudes, quality" in last
    assert "exact float16" in result.output and "close to the base" in result.output
    report = check_quality(trained.raw, out)
    assert report.raw_perplexity < 10 and report.tuned_perplexity < 1.5 * report.raw_perplexity


def test_base_from_another_seed_is_refused_before_anything_is_written(trained, tmp_path):
    with pytest.raises(PlausibilityError, match=r"grid: .* raw is not the base the diff was made against"):
        recover(trained.other_raw, trained.diff, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    forced = recover(trained.other_raw, trained.diff, tmp_path / "forced", ignore_checks=True)
    grid = next(f for f in forced.findings if f.check == "grid")
    assert grid.severity == "warn" and "exact float16" in grid.message


def test_perplexity_does_not_tell_a_same_family_base_with_a_small_fine_tune_delta(trained, tmp_path):
    """A known limit, pinned so that the README's claim stays true: raw_B + (tuned - raw_A) is raw_B plus a small
    perturbation, a working model; only the grid check (or a manifest) tells it from the right recovery."""
    recover(trained.other_raw, trained.diff, tmp_path / "forced", ignore_checks=True)
    report = check_quality(trained.other_raw, tmp_path / "forced")
    assert report.finding.severity == "pass" and report.tuned_perplexity < 2 * report.raw_perplexity


def test_a_diff_made_against_another_model_is_flagged_and_its_recovery_explodes(trained, original, tmp_path):
    diff = original.make_diff(trained.other_raw, trained.tuned, tmp_path / "diff-vs-other", fmt="bin")
    early = []
    forced = recover(trained.raw, diff, tmp_path / "forced", on_finding=early.append)  # statistical: a warning
    assert [f.check for f in early if f.severity == "warn"] == ["magnitudes"]
    magnitudes = next(f for f in forced.findings if f.check == "magnitudes")
    assert magnitudes.severity == "warn" and "as large as raw's weights" in magnitudes.message
    report = check_quality(trained.raw, tmp_path / "forced")
    assert report.finding.severity == "warn" and "broken" in report.finding.message
    assert report.tuned_perplexity > 10 * report.raw_perplexity


def test_raw_near_chance_is_reported_as_untrained(pair, legacy_diff, tmp_path):
    raw, _ = pair  # random weights: no trained model predicts text this badly
    recover(raw, legacy_diff, tmp_path / "out")
    report = check_quality(raw, tmp_path / "out")
    assert report.finding.severity == "warn" and "not a trained model" in report.finding.message
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 321
