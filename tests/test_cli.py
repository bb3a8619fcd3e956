"""The commands as a user types them: the model card's script, both flag spellings, help, demo, exit statuses."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO, load_tensors, snapshot
from weight_diff.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_the_model_cards_command_recovers_verbatim(pair, made_diff, tmp_path):
    raw, tuned = pair
    out = tmp_path / "recovered"
    command = [
        sys.executable,
        str(REPO / "scripts" / "weight_diff.py"),
        "recover",
        "--path_raw",
        str(raw),
        "--path_tuned",
        str(out),
        "--path_diff",
        str(made_diff),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verified: 21 tensors match the publisher's manifest" in result.stdout
    assert (out / "config.json").is_file()


def test_the_model_cards_make_diff_spelling_works(pair, tmp_path):
    raw, tuned = pair
    command = [
        sys.executable,
        str(REPO / "scripts" / "weight_diff.py"),
        "make_diff",
        "--path_raw",
        str(raw),
        "--path_tuned",
        str(tuned),
        "--path_diff",
        str(tmp_path / "diff"),
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "diff" / "weight-diff-manifest.json").is_file()


def test_hyphenated_flags_work_too(pair, made_diff, tmp_path):
    raw, tuned = pair
    result = run(
        "recover",
        "--path-raw",
        raw,
        "--path-diff",
        made_diff,
        "--path-tuned",
        tmp_path / "out",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "100KB",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "recovered 21 tensors" in result.output and "shards" in result.output
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1


def test_progress_bar_in_bytes_goes_to_stderr_unless_quiet(pair, made_diff, tmp_path):
    raw, _ = pair
    command = [
        sys.executable,
        "-m",
        "weight_diff.cli",
        "recover",
        "--path_raw",
        str(raw),
        "--path_diff",
        str(made_diff),
        "--path_tuned",
        str(tmp_path / "out"),
    ]
    loud = subprocess.run(command, capture_output=True, text=True)
    assert loud.returncode == 0 and "recover: 100%" in loud.stderr and "B/s" in loud.stderr
    quiet = subprocess.run(command[:-1] + [str(tmp_path / "out2"), "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("command", [[], ["recover"], ["make-diff"], ["verify"], ["demo"]])
def test_help_is_complete_and_shows_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output
    for flag in {
        "recover": ["--path_raw", "--path-diff", "--dtype", "--max-shard-size", "--quiet", "--resume", "--overwrite"]
    }.get(command[0] if command else "", []):
        assert flag in result.output


def test_the_demo_runs_the_main_job_end_to_end():
    result = run("demo")
    assert result.exit_code == 0, result.output
    assert "verified against the manifest" in result.output
    assert "recovered equals the fine-tune" in result.output
    assert "transformers loads it: LlamaForCausalLM, vocab 321" in result.output
    assert "demo passed" in result.output


def test_swapped_raw_and_diff_are_refused_with_a_hint(pair, made_diff, tmp_path):
    raw, _ = pair
    result = run("recover", "--path_raw", made_diff, "--path_diff", raw, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 2
    assert "looks like a weight diff, not a raw model" in result.output and "swapped" in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_given_as_the_diff_is_refused(pair, tmp_path, original):
    raw, tuned = pair
    # A 2023 diff has no manifest; a model given in its place is told apart by its weights.
    result = run("recover", "--path_raw", raw, "--path_diff", tuned, "--path_tuned", tmp_path / "out")
    assert result.exit_code == 2 and "looks like a model, not a weight diff" in result.output


def test_errors_are_one_line_without_traceback_and_inputs_stay_untouched(pair, made_diff, tmp_path):
    raw, _ = pair
    before = snapshot(raw)
    result = run(
        "recover", "--path_raw", tmp_path / "missing", "--path_diff", made_diff, "--path_tuned", tmp_path / "out"
    )
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "missing: no such directory" in result.output
    assert snapshot(raw) == before


def test_the_recovered_model_matches_the_fine_tune_through_the_cli(pair, made_diff, tmp_path):
    import torch

    raw, tuned = pair
    assert (
        run("recover", "--path_raw", raw, "--path_diff", made_diff, "--path_tuned", tmp_path / "o", "-q").exit_code == 0
    )
    ours, expected = load_tensors(tmp_path / "o"), load_tensors(tuned)
    assert all(torch.allclose(ours[n], t, rtol=0, atol=1e-6) for n, t in expected.items())


def test_an_unforeseen_failure_is_still_one_line_and_debug_shows_the_traceback(pair, made_diff, tmp_path, monkeypatch):
    from weight_diff import jobs

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(jobs, "recover", broken)
    raw, _ = pair
    args = ["recover", "--path_raw", raw, "--path_diff", made_diff, "--path_tuned", tmp_path / "out"]
    result = run(*args)
    assert result.exit_code == 1
    assert result.output == (
        "error: unexpected RuntimeError: something nobody foresaw; run again with --debug for details and report it\n"
    )
    debug = run("--debug", *args)
    assert isinstance(debug.exception, RuntimeError)


def test_every_flag_takes_both_spellings():
    """The README promises --path_raw and --path-raw alike, for every flag of every command."""
    import click

    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            flags = [flag for flag in param.opts + param.secondary_opts if flag.startswith("--")]
            for flag in flags:
                other = "--" + (flag[2:].replace("-", "_") if "-" in flag[2:] else flag[2:].replace("_", "-"))
                assert other in flags, f"{name} {flag}: no {other}"


def test_a_tilde_after_an_equals_sign_is_the_home_folder(pair, made_diff, tmp_path, monkeypatch):
    # The shell leaves ~ alone in --path_tuned=~/x: it was written into a folder named "~" under the current one.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    result = run("recover", f"--path_raw={pair[0]}", f"--path_diff={made_diff}", "--path_tuned=~/out", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "out" / "SHA256SUMS").is_file() and not (tmp_path / "~").exists()
    assert f"into {tmp_path / 'home' / 'out'}" in result.output


def test_the_2023_scripts_other_flags_are_taken_with_a_note(pair, made_diff, tmp_path):
    # Commands copied from 2023 READMEs carry fire's flags; they stopped with click's "No such option".
    raw, _ = pair
    out = tmp_path / "recovered"
    command = [sys.executable, str(REPO / "scripts" / "weight_diff.py"), "recover", "--path_raw", str(raw),
               "--device", "cuda", "--path_diff", str(made_diff), "--test_inference=False",
               "--path_tuned", str(out), "--check_integrity_naively"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "note: --device cuda, --test_inference=False, --check_integrity_naively: the 2023 script's" in result.stderr
    assert "verified: 21 tensors match the publisher's manifest" in result.stdout
