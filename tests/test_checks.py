"""Plausibility checks: a base rounded through bfloat16, another model's config, a diff that is not tuned - raw."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import load_tensors, snapshot
from weight_diff.checks import (
    CONFIG,
    PASS,
    PRECISION,
    REFUSE,
    WARN,
    Evidence,
    config_finding,
    describe_config,
    final_line,
    float16_low_bits,
    magnitude_finding,
    precision_finding,
)
from weight_diff.cli import main
from weight_diff.errors import IntegrityError, PlausibilityError
from weight_diff.jobs import make_diff, recover
from weight_diff.tiny_llama import save_checkpoint

LLAMA1_13B = {
    "architectures": ["LLaMAForCausalLM"],  # as 2023 conversions spelled it
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06,
    "vocab_size": 32001,
    "torch_dtype": "float32",
}
LLAMA2_13B = LLAMA1_13B | {
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "num_key_value_heads": 40,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
}


def genuine_float16(count: int, generator: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    return (torch.randn(count, generator=generator) * scale).to(torch.float16)


def through_bfloat16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(torch.float16)


def test_bfloat16_keeps_7_of_float16s_10_mantissa_bits():
    generator = torch.Generator().manual_seed(0)
    genuine = genuine_float16(100_000, generator)
    normal, low_zero = float16_low_bits(genuine)
    assert normal > 99_000 and 0.11 < low_zero / normal < 0.14  # 1 in 8, as chance has it
    normal, low_zero = float16_low_bits(through_bfloat16(genuine))
    assert normal > 99_000 and low_zero == normal
    assert float16_low_bits(torch.tensor([0.0, 1e-7, float("inf")], dtype=torch.float16)) == (0, 0)


def test_no_false_alarm_on_many_random_genuine_float16_tensors():
    """300 genuine float16 tensors (normal, uniform, heavy-tailed; 8K to 36K values; std 1e-3 to 1) never look
    rounded through bfloat16; the same tensors rounded always do. (scripts/false_alarms.py measures many more.)"""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for index in range(300):
        count = 4096 * (2 + index % 8)
        scale = 10 ** (-3 + 3 * (index % 97) / 96)
        draw = torch.randn(count, generator=generator)
        if index % 3 == 1:
            draw = torch.rand(count, generator=generator) * 2 - 1
        elif index % 3 == 2:
            draw = draw * torch.randn(count, generator=generator)  # heavy tails
        genuine = (draw * scale).to(torch.float16)
        for tensor, rounded in ((genuine, False), (through_bfloat16(genuine), True)):
            evidence = Evidence()
            evidence.observe("w", tensor.view(-1, 64), torch.zeros(count).view(-1, 64), limit=count)
            finding = precision_finding(evidence, {"torch_dtype": "float16"}, other_role="diff")
            assert finding.severity == (REFUSE if rounded else PASS), (index, finding.message)
            if not rounded:
                worst = max(worst, evidence.float16_low_zero / evidence.float16_normal)
    assert worst < 0.2


def test_configs_name_llama2_given_for_llama1():
    assert describe_config(LLAMA1_13B) == "LLaMA-1 13B" and describe_config(LLAMA2_13B) == "LLaMA-2 13B"
    finding = config_finding(LLAMA2_13B, LLAMA1_13B, other_role="diff")
    assert finding.severity == REFUSE
    assert "rms_norm_eps 1e-05, max_position_embeddings 4096" in finding.message
    assert "raw looks like LLaMA-2 13B, the diff was made from LLaMA-1 13B" in finding.message
    assert "--ignore-checks" in finding.message


def test_configs_of_one_model_from_2023_and_2026_agree_whatever_their_spelling():
    modern = LLAMA1_13B | {
        "architectures": ["LlamaForCausalLM"],
        "num_key_value_heads": 40,
        "head_dim": 128,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "dtype": "float16",
    }
    assert config_finding(modern, LLAMA1_13B, other_role="diff").severity == PASS
    assert config_finding({}, LLAMA1_13B, other_role="diff").severity == PASS  # nothing to compare


def test_a_longer_context_with_rope_scaling_is_a_warning_and_other_heads_a_refusal():
    extended = LLAMA1_13B | {"max_position_embeddings": 8192, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert config_finding(LLAMA1_13B, extended, other_role="diff").severity == WARN
    other_heads = LLAMA1_13B | {"num_attention_heads": 20}
    finding = config_finding(other_heads, LLAMA1_13B, other_role="diff")
    assert finding.severity == REFUSE and "num_attention_heads 20" in finding.message


def test_bfloat16_weights_under_a_float16_config_are_the_433_conversion():
    evidence = Evidence()
    evidence.observe("w", torch.ones(4, 4, dtype=torch.bfloat16), torch.zeros(4, 4))
    assert precision_finding(evidence, {"torch_dtype": "float16"}, other_role="diff").severity == REFUSE
    assert precision_finding(evidence, {"torch_dtype": "bfloat16"}, other_role="diff").severity == WARN


def test_magnitudes_name_the_tensors_where_the_diff_is_as_large_as_raw():
    generator = torch.Generator().manual_seed(2)
    evidence = Evidence()
    raw = torch.randn(64, 64, generator=generator)
    evidence.observe("small", raw, raw * 0.01)
    evidence.observe("large", raw, torch.randn(64, 64, generator=generator))
    finding = magnitude_finding(evidence, other_role="diff")
    assert finding.severity == WARN and "in 1 of 2 tensors" in finding.message and "large 1.0" in finding.message
    assert magnitude_finding(Evidence(), other_role="diff").severity == PASS


def test_the_last_line_says_verified_plausible_or_warning():
    from weight_diff.checks import Finding

    passed = [Finding("config", PASS, ""), Finding("precision", PASS, "")]
    assert final_line(verified=True, findings=[], tensors=363).startswith("verified: 363 tensors")
    line = final_line(verified=False, findings=passed, tensors=363)
    assert line.startswith("not verified: the diff has no manifest, but every plausibility check passed: config")
    warned = [*passed, Finding("magnitudes", WARN, "")]
    assert final_line(verified=False, findings=warned, tensors=363).startswith("warning: ")


def _raw_variant(copy_dir, raw, name, change, config=None):
    """A copy of raw with its weights changed by ``change`` (and its config.json updated by ``config``)."""
    target = copy_dir(raw, name)
    save_checkpoint({n: change(t) for n, t in load_tensors(raw).items()}, target)
    if config:
        body = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(body | config))
    return target


def recover_cli(*args):
    return CliRunner().invoke(main, ["recover", *map(str, args), "--quiet"])


def test_a_base_rounded_through_bfloat16_is_refused_before_any_write(pair, legacy_diff, copy_dir, tmp_path):
    raw = _raw_variant(copy_dir, pair[0], "rounded", through_bfloat16)
    out = tmp_path / "out"
    result = recover_cli("--path_raw", raw, "--path_diff", legacy_diff, "--path_tuned", out)
    assert result.exit_code == 1 and not out.exists()
    assert result.output.startswith("error: refused: precision: 100.0% of ")
    assert "transformers >= 4.33" in result.output and "--ignore-checks" in result.output

    result = recover_cli("--path_raw", raw, "--path_diff", legacy_diff, "--path_tuned", out, "--ignore-checks")
    assert result.exit_code == 0, result.output
    assert "warning: precision: 100.0%" in result.output
    assert result.output.strip().splitlines()[-1].startswith("warning: not verified (the diff has no manifest) and 1")


def test_the_433_conversion_stored_in_bfloat16_is_refused(pair, legacy_diff, copy_dir, tmp_path):
    raw = _raw_variant(copy_dir, pair[0], "bf16", lambda t: t.to(torch.bfloat16), config={"torch_dtype": "float16"})
    with pytest.raises(PlausibilityError, match="bfloat16 while its config.json says float16"):
        recover(raw, legacy_diff, tmp_path / "out")


def test_llama2_style_config_is_refused_naming_both(pair, legacy_diff, copy_dir, tmp_path):
    raw = copy_dir(pair[0], "llama2")
    body = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(body | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}))
    before = snapshot(raw)
    result = recover_cli("--path_raw", raw, "--path_diff", legacy_diff, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert "error: refused: config: raw's config.json says rms_norm_eps 1e-05, max_position_embeddings 4096" in (
        result.output
    )
    assert snapshot(raw) == before


def test_a_manifest_decides_and_the_checks_do_not_refuse(pair, made_diff, copy_dir, tmp_path):
    raw = _raw_variant(copy_dir, pair[0], "rounded", through_bfloat16)
    with pytest.raises(IntegrityError, match="differs from the one the diff was made against"):
        recover(raw, made_diff, tmp_path / "out")
    report = recover(pair[0], made_diff, tmp_path / "right")
    assert report.verified and all(f.severity == PASS for f in report.findings)


def test_make_diff_warns_when_tuned_is_not_a_fine_tune_of_raw(pair, build_pair, tmp_path):
    other_raw, _ = build_pair(seed=7)
    warned = []
    report = make_diff(other_raw, pair[1], tmp_path / "diff", on_finding=warned.append)
    assert [f.check for f in warned if f.severity == WARN] == ["magnitudes"]
    assert "the tuned model is not a fine-tune of this raw model" in warned[-1].message
    assert [f.severity for f in report.findings if f.check == "magnitudes"] == [WARN]


# --- the compact path: the checks that apply to it, with the same --ignore-checks ---------------------------------


def make_cli(*args):
    return CliRunner().invoke(main, ["make-diff", "--format", "compact", *map(str, args), "--quiet"])


def test_compact_make_diff_refuses_a_base_rounded_through_bfloat16_before_any_write(pair, copy_dir, tmp_path):
    raw = _raw_variant(copy_dir, pair[0], "rounded", through_bfloat16)
    out = tmp_path / "diff"
    result = make_cli("--path_raw", raw, "--path_tuned", pair[1], "--path_diff", out)
    assert result.exit_code == 1 and not out.exists(), result.output
    assert result.output.startswith("error: refused: precision: 100.0% of ")
    assert "--ignore-checks" in result.output
    result = make_cli("--path_raw", raw, "--path_tuned", pair[1], "--path_diff", out, "--ignore-checks")
    assert result.exit_code == 0, result.output
    assert "warning: precision: 100.0%" in result.output


def test_compact_make_diff_refuses_a_llama2_config_and_warns_on_another_model(pair, build_pair, copy_dir, tmp_path):
    raw = copy_dir(pair[0], "llama2")
    body = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(body | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}))
    result = make_cli("--path_raw", raw, "--path_tuned", pair[1], "--path_diff", tmp_path / "diff")
    assert result.exit_code == 1 and not (tmp_path / "diff").exists(), result.output
    assert "error: refused: config: raw's config.json says rms_norm_eps 1e-05, max_position_embeddings 4096" in (
        result.output
    )
    other_raw, _ = build_pair(seed=7)
    warned = []
    report = make_diff(other_raw, pair[1], tmp_path / "d2", diff_format="compact", on_finding=warned.append)
    assert [f.check for f in warned if f.severity == WARN] == ["magnitudes"]
    assert [f.severity for f in report.findings if f.check == "magnitudes"] == [WARN]


def test_compact_recover_runs_the_config_and_precision_checks(pair, copy_dir, tmp_path):
    diff = tmp_path / "diff"
    make_diff(pair[0], pair[1], diff, diff_format="compact")
    report = recover(pair[0], diff, tmp_path / "right")
    assert report.verified and [(f.check, f.severity) for f in report.findings] == [(CONFIG, PASS), (PRECISION, PASS)]
    assert "genuine float16" in report.findings[1].message
    raw = copy_dir(pair[0], "llama2")
    body = json.loads((raw / "config.json").read_text())
    (raw / "config.json").write_text(json.dumps(body | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}))
    warned = []
    report = recover(raw, diff, tmp_path / "out", on_finding=warned.append)  # the manifest decides: not refused
    assert report.verified and [f.check for f in warned if f.severity != PASS] == [CONFIG]
    assert "config: raw's config.json says rms_norm_eps 1e-05" in warned[0].message
    (diff / "weight-diff-manifest.json").unlink()  # without a manifest, the checks refuse as for a float32 diff
    sums = [line for line in (diff / "SHA256SUMS").read_text().splitlines() if "manifest" not in line]
    (diff / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    with pytest.raises(PlausibilityError, match="config: raw's config.json says rms_norm_eps 1e-05"):
        recover(raw, diff, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    report = recover(raw, diff, tmp_path / "o3", ignore_checks=True)
    assert not report.verified and [f.severity for f in report.findings if f.check == CONFIG] == [WARN]
