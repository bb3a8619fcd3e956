"""Hostile and careless input, built in-process: every case is one clear line, a non-zero status, no traceback,
and the inputs and the current directory byte-for-byte unchanged (issue 10)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import snapshot
from weight_diff.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_refusal(result, status: int, message: str) -> None:
    assert result.exit_code == status, result.output
    assert result.output.startswith("error: "), result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output and "report it" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output, result.output


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding a file of the user's, which no run may touch."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's own file")
    (cwd / "sub").mkdir()
    (cwd / "sub" / "more.txt").write_text("also the user's")
    monkeypatch.chdir(cwd)
    return cwd


# --- destroys data: an empty path, --overwrite of what is not ours ------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["recover", "--path_raw", "RAW", "--path_diff", "DIFF", "--path_tuned", "", "--overwrite"],
        ["recover", "--path_raw", "RAW", "--path_diff", "DIFF", "--path_tuned", "", "--resume"],
        ["make-diff", "--path_raw", "RAW", "--path_tuned", "TUNED", "--path_diff", "", "--overwrite"],
        ["recover", "--path_raw", "", "--path_diff", "DIFF", "--path_tuned", "OUT"],
        ["recover", "--path_raw", "RAW", "--path_diff", "", "--path_tuned", "OUT"],
        ["verify", ""],
        ["verify", "OUT0", "--diff", ""],
        ["inspect", ""],
        ["compare", "", "RAW"],
        ["generate", "", "--prompt", "hi"],
    ],
    ids=lambda args: " ".join(a or "''" for a in args[:1] + [a for a in args if a in ("", "--overwrite", "--resume")]),
)
def test_an_empty_path_is_refused_and_the_cwd_is_untouched(pair, made_diff, workdir, tmp_path, args):
    raw, tuned = pair
    out0 = tmp_path / "out0"
    shutil.copytree(raw, out0)
    names = {"RAW": raw, "DIFF": made_diff, "TUNED": tuned, "OUT": tmp_path / "out", "OUT0": out0}
    before = snapshot(workdir), snapshot(made_diff), snapshot(raw)
    result = run(*[names.get(arg, arg) for arg in args])
    assert_one_line_refusal(result, 2, "an empty path was given")
    assert (snapshot(workdir), snapshot(made_diff), snapshot(raw)) == before
    assert not (tmp_path / "out").exists()


def recover_cli(raw, diff, out, *extra):
    return run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--quiet", *extra)


@pytest.mark.parametrize(
    "layout",
    ["user-files", "hf-model", "ours-plus-user-file", "ours-plus-folder", "ours-plus-symlink"],
)
def test_overwrite_removes_only_what_weight_diff_wrote(pair, made_diff, tmp_path, layout):
    raw, tuned = pair
    out = tmp_path / "out"
    if layout == "user-files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif layout == "hf-model":
        shutil.copytree(tuned, out)  # a model of someone else's, not an output of ours
    else:
        assert recover_cli(raw, made_diff, out).exit_code == 0
        if layout == "ours-plus-user-file":
            (out / "thesis.tex").write_text("years of work")
        elif layout == "ours-plus-folder":
            (out / "checkpoints").mkdir()
            (out / "checkpoints" / "step-100.pt").write_text("keep")
        else:
            (out / "link").symlink_to(tmp_path)
    before = snapshot(out)
    result = recover_cli(raw, made_diff, out, "--overwrite")
    assert_one_line_refusal(result, 2, "--overwrite will not")
    assert snapshot(out) == before


def test_overwrite_replaces_an_earlier_output_of_ours(pair, made_diff, tmp_path):
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "200KB").exit_code == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    result = recover_cli(raw, made_diff, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not list(out.glob("model-*.safetensors")) and (out / "model.safetensors").is_file()
    assert run("verify", out).exit_code == 0


# --- one writer per output -------------------------------------------------------------------------------------


@pytest.fixture
def held(tmp_path):
    """Return a function that locks a directory as a running weight-diff would, until the test ends."""
    fds = []

    def hold(directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fds.append(fd)

    yield hold
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("state", ["new-empty", "unfinished-resume", "finished-overwrite"])
def test_a_second_run_into_a_locked_output_is_refused(pair, made_diff, tmp_path, held, monkeypatch, state):
    raw, tuned = pair
    out = tmp_path / "out"
    extra = []
    if state == "unfinished-resume":
        from weight_diff import writer

        calls = {"n": 0}
        real_finish = writer.ShardWriter.finish

        def finish_then_stop(self):
            real_finish(self)
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(writer.ShardWriter, "finish", finish_then_stop)
        assert recover_cli(raw, made_diff, out, "--max-shard-size", "200KB").exit_code == 130
        monkeypatch.undo()
        extra = ["--max-shard-size", "200KB", "--resume"]
    elif state == "finished-overwrite":
        assert recover_cli(raw, made_diff, out).exit_code == 0
        extra = ["--overwrite"]
    held(out)
    before = snapshot(out)
    result = recover_cli(raw, made_diff, out, *extra)
    assert_one_line_refusal(result, 2, "another weight-diff run is writing there")
    assert snapshot(out) == before
    made = run("make-diff", "--path_raw", raw, "--path_tuned", tuned, "--path_diff", out, "--quiet", *extra)
    assert_one_line_refusal(made, 2, "another weight-diff run is writing there")
    assert snapshot(out) == before


def test_the_lock_leaves_nothing_in_a_finished_output(pair, made_diff, tmp_path):
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out).exit_code == 0
    listed = (out / "SHA256SUMS").read_text()
    assert all(p.name in listed or p.name == "SHA256SUMS" for p in out.iterdir()), sorted(os.listdir(out))
    # and the lock is released: the next run may take the output
    assert recover_cli(raw, made_diff, out, "--overwrite").exit_code == 0


# --- nothing read outside the named folders ---------------------------------------------------------------------


def _sharded_copy(made_diff: Path, copy_dir) -> tuple[Path, dict]:
    diff = copy_dir(made_diff)
    index = json.loads((diff / "model.safetensors.index.json").read_text())
    return diff, index


@pytest.mark.parametrize(
    "target, message",
    [
        ("../outside.safetensors", "which is not a file inside"),
        ("/ABS/outside.safetensors", "which is not a file inside"),
        ("sub/../../outside.safetensors", "which is not a file inside"),
        ("", "which is not a file inside"),
        (5, "not a file name"),
        (None, "not a file name"),
        ("fifo.safetensors", "not a regular file"),
        ("folder.safetensors", "not a regular file"),
        ("/dev/zero", "which is not a file inside"),
    ],
)
def test_an_index_naming_a_file_outside_its_directory_is_refused_unread(
    pair, made_diff, copy_dir, tmp_path, target, message
):
    raw, _ = pair
    diff, index = _sharded_copy(made_diff, copy_dir)
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(diff / first, tmp_path / "outside.safetensors")  # a valid shard, but not the diff's to name
    os.mkfifo(diff / "fifo.safetensors")
    (diff / "folder.safetensors").mkdir()
    if isinstance(target, str):
        target = target.replace("/ABS", str(tmp_path))
    index["weight_map"] = {name: target if file == first else file for name, file in index["weight_map"].items()}
    (diff / "model.safetensors.index.json").write_text(json.dumps(index))
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_one_line_refusal(result, 1, message)
    assert snapshot(diff) == before and not (tmp_path / "out").exists()
    assert_one_line_refusal(run("inspect", diff), 1, message)


@pytest.mark.parametrize(
    "listed, detail",
    [
        ("../secret.txt", "not a file inside"),
        ("/ABS/secret.txt", "not a file inside"),
        ("/proc/self/pagemap", "not a file inside"),
        ("/dev/zero", "not a file inside"),
        ("fifo", "not a regular file"),
        ("folder", "not a regular file"),
    ],
)
def test_verify_never_hashes_a_file_outside_the_directory(pair, made_diff, tmp_path, listed, detail):
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out).exit_code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.mkfifo(out / "fifo")
    (out / "folder").mkdir()
    name = listed.replace("/ABS", str(tmp_path))
    import hashlib

    with (out / "SHA256SUMS").open("a") as sums:
        sums.write(f"{hashlib.sha256(b'not yours').hexdigest()}  {name}\n")
    result = run("verify", out)
    assert result.exit_code == 1, result.output
    assert f"MISMATCH {name}: {detail}" in result.output, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
