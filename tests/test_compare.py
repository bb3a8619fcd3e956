"""``weight-diff compare``: tensor by tensor, streamed; exit 0 when all agree within --tol, 1 when not, 2 on errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weight_diff.cli import main
from weight_diff.compare import compare_models
from weight_diff.tiny_llama import make_raw_and_tuned, save_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A float16 raw and a float32 tuned tiny LLaMA (vocab 320 and 321)."""
    return make_raw_and_tuned(tmp_path_factory.mktemp("compare"))


@pytest.fixture(scope="module")
def tuned_state(pair) -> dict[str, torch.Tensor]:
    from weight_diff.checkpoint import Checkpoint

    with Checkpoint.open(pair[1]) as tuned:
        return {name: tuned.read_rows(info, 0, info.rows).clone() for name, info in tuned.tensors.items()}


def run(*args: str):
    return CliRunner().invoke(main, ["compare", "--quiet", *map(str, args)])


def weights(directory: Path, state: dict[str, torch.Tensor], **options) -> Path:
    save_checkpoint(state, directory, **options)
    return directory


def test_identical_models_agree_with_exit_status_0(pair, tmp_path):
    copy = shutil.copytree(pair[1], tmp_path / "copy")

    result = run(pair[1], copy)

    assert result.exit_code == 0, result.output
    assert "overall: max |A-B| = 0.000e+00; 100.0000% of values identical" in result.stdout
    assert "agree: every tensor matches within tolerance 0 (bit-exact)" in result.stdout


def test_same_values_in_another_layout_and_sharding_agree(tuned_state, tmp_path):
    a = weights(tmp_path / "a", tuned_state)
    b = weights(tmp_path / "b", dict(reversed(tuned_state.items())), fmt="bin", shards=3)

    assert run(a, b).exit_code == 0


def test_one_changed_value_differs_at_tol_0_and_agrees_within_a_larger_tol(tuned_state, tmp_path):
    changed = dict(tuned_state)
    changed["model.layers.1.mlp.down_proj.weight"] = tuned_state["model.layers.1.mlp.down_proj.weight"].clone()
    changed["model.layers.1.mlp.down_proj.weight"][63, 159] += 2**-10
    a, b = weights(tmp_path / "a", tuned_state), weights(tmp_path / "b", changed)

    strict = run(a, b)
    assert strict.exit_code == 1
    worst = next(line for line in strict.stdout.splitlines() if line.startswith("model.layers.1.mlp.down_proj.weight"))
    assert float(worst.split()[1]) == pytest.approx(2**-10, rel=1e-3)
    assert worst.split()[2] == f"{1 - 1 / (64 * 160):.2%}"
    assert "DIFFER: 1 of 21 exceed tolerance 0 (bit-exact)" in strict.stdout
    assert run(a, b, "--tol", "1e-3").exit_code == 0
    assert run(a, b, "--tol", "1e-4").exit_code == 1


def test_missing_extra_and_misshapen_tensors_differ(pair, tuned_state, tmp_path):
    mismatched = {n: t for n, t in tuned_state.items() if n != "model.layers.0.mlp.up_proj.weight"}
    mismatched["model.layers.2.mlp.up_proj.weight"] = tuned_state["model.layers.0.mlp.up_proj.weight"]
    b = weights(tmp_path / "b", mismatched)

    result = run(pair[1], b)

    assert result.exit_code == 1
    assert "only in A (1): model.layers.0.mlp.up_proj.weight" in result.stdout
    assert "only in B (1): model.layers.2.mlp.up_proj.weight" in result.stdout
    vocab = run(pair[0], pair[1])  # raw has 320 vocabulary rows, tuned 321
    assert vocab.exit_code == 1
    assert "shape differs: lm_head.weight: A [320, 64], B [321, 64]" in vocab.stdout
    assert "dtype differs: A float16, B float32" in vocab.stdout


def test_values_equal_across_dtypes_agree_at_tol_0(pair, tmp_path):
    from weight_diff.checkpoint import Checkpoint

    with Checkpoint.open(pair[0]) as raw:
        upcast = {n: raw.read_rows(i, 0, i.rows).to(torch.float32) for n, i in raw.tensors.items()}

    result = run(pair[0], weights(tmp_path / "raw32", upcast))

    assert result.exit_code == 0, result.output
    assert "dtype differs: A float16, B float32 (values compared as numbers)" in result.stdout


def test_a_recovered_model_is_within_rounding_of_the_tuned_reference(pair, tmp_path):
    """raw + (tuned - raw) in float32 is not always tuned to the last bit: compare shows by how much."""
    diff, out = tmp_path / "diff", tmp_path / "out"
    runner = CliRunner()
    for command in (
        ["make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", diff, "-q"],
        ["recover", "--path_raw", pair[0], "--path_diff", diff, "--path_tuned", out, "-q"],
    ):
        assert runner.invoke(main, list(map(str, command))).exit_code == 0

    report = compare_models(out, pair[1], tol=1e-6)

    assert report.agrees
    assert 0 <= report.max_abs_diff < 1e-8
    assert report.identical_share > 0.99


def test_blocks_smaller_than_a_tensor_give_the_same_report(tuned_state, tmp_path):
    changed = {n: t.clone() for n, t in tuned_state.items()}
    changed["lm_head.weight"][300, 5] += 0.5  # far into the tensor: only a late block sees it
    a, b = weights(tmp_path / "a", tuned_state), weights(tmp_path / "b", changed)

    whole = compare_models(a, b, block_bytes=2**30)
    streamed = compare_models(a, b, block_bytes=1000)  # 3 rows of 64 float32 a block; rows larger are taken one

    assert streamed == whole
    assert whole.max_abs_diff == pytest.approx(0.5, rel=1e-6)
    worst = whole.worst(1)[0]
    assert (worst.name, worst.identical) == ("lm_head.weight", 321 * 64 - 1)


def test_nan_inf_and_signed_zero(tmp_path):
    a = torch.tensor([[float("nan"), 1.0, float("inf"), 0.0, 2.0]])
    b = torch.tensor([[float("nan"), float("nan"), float("inf"), -0.0, 2.0]])
    report = compare_models(weights(tmp_path / "a", {"w": a}), weights(tmp_path / "b", {"w": b}), tol=1.0)

    (tensor,) = report.tensors
    assert tensor.max_abs_diff == math.inf  # a number facing a NaN never agrees
    assert tensor.identical == 3  # NaN/NaN, inf/inf and 2/2 have the same bits; 0.0/-0.0 do not
    same_but_sign = compare_models(weights(tmp_path / "c", {"w": a[:, 3:]}), weights(tmp_path / "d", {"w": b[:, 3:]}))
    assert same_but_sign.max_abs_diff == 0.0
    assert not same_but_sign.agrees  # tol 0 asks for identical bits


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--tol", "-1"], "--tol -1.0: give a tolerance of 0 or more"), (["--tol", "nan"], "give a tolerance")],
)
def test_a_bad_tolerance_is_a_usage_error(pair, args, message):
    result = run(pair[1], pair[1], *args)

    assert result.exit_code == 2
    assert message in result.stderr


def test_an_unreadable_input_exits_2_not_1(pair, tmp_path):
    result = run(pair[1], tmp_path / "nowhere")

    assert result.exit_code == 2  # 1 would read as "the models differ"
    assert result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such directory"
