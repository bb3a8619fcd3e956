"""Every bad input gets one clear line and an exit status; nothing half-written looks whole; inputs never change."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import fill_disk_after, interrupt_after, load_tensors, snapshot
from weight_diff import output, writer
from weight_diff.cli import main
from weight_diff.jobs import recover
from weight_diff.tiny_llama import save_checkpoint


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def recover_cli(raw, diff, out, *extra):
    return run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "--quiet", *extra)


def assert_refused(result, status, message, out, *inputs_before):
    assert result.exit_code == status, result.output
    assert message in result.output, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert not (out / "config.json").exists(), "a failed run left a model behind"
    assert not list(out.glob("*.partial")) if out.is_dir() else True
    for directory, before in inputs_before:
        assert snapshot(directory) == before, f"{directory} was changed"


# --- damaged or wrong inputs ------------------------------------------------------------------------------------


def remove_second_shard(diff):
    (diff / "pytorch_model-00002-of-00002.bin").unlink()
    return "pytorch_model-00002-of-00002.bin: shard named in pytorch_model.bin.index.json is missing"


def truncate_shard(diff):
    path = diff / "pytorch_model-00001-of-00002.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "pytorch_model-00001-of-00002.bin: not a"


def garbage_safetensors(diff):
    for path in diff.glob("*.bin*"):
        path.unlink()
    (diff / "model.safetensors").write_bytes(os.urandom(10_000))
    return "model.safetensors: not a safetensors file"


def corrupt_zip(diff):
    path = diff / "pytorch_model-00002-of-00002.bin"
    data = bytearray(path.read_bytes())
    data[40:400] = bytes(360)  # zeros over the pickle record: a damaged download
    path.write_bytes(bytes(data))
    return "pytorch_model-00002-of-00002.bin: not a"


def no_weights(diff):
    for path in diff.glob("pytorch_model*"):
        path.unlink()
    return "no weights in a known layout"


def integer_tensor(diff):
    tensors = load_tensors(diff)
    tensors["model.norm.weight"] = torch.zeros(64, dtype=torch.int64)
    for path in diff.glob("pytorch_model*"):
        path.unlink()
    save_checkpoint(tensors, diff, fmt="safetensors")
    return "diff tensor model.norm.weight is torch.int64, not floating point"


@pytest.mark.parametrize(
    "damage", [remove_second_shard, truncate_shard, garbage_safetensors, corrupt_zip, no_weights, integer_tensor]
)
def test_a_damaged_diff_is_named_and_nothing_is_written(pair, legacy_diff, copy_dir, tmp_path, damage):
    raw, _ = pair
    diff = copy_dir(legacy_diff)
    message = damage(diff)
    raw_before, diff_before = snapshot(raw), snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_refused(result, 1, message, tmp_path / "out", (raw, raw_before), (diff, diff_before))
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_would_run_code_is_refused_and_its_marker_never_appears(pair, legacy_diff, copy_dir, tmp_path):
    raw, _ = pair
    diff = copy_dir(legacy_diff)
    marker = tmp_path / "marker-must-not-exist"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"lm_head.weight": Payload()}, diff / "pytorch_model-00001-of-00002.bin")
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_refused(result, 1, "refused: its pickle holds code", tmp_path / "out", (diff, before))
    assert "it was not executed" in result.output and "posix.system" in result.output
    assert not marker.exists()


def test_a_7b_sized_raw_for_this_diff_names_both_sizes(build_pair, legacy_diff, tmp_path):
    raw, _ = build_pair(config_overrides={"hidden_size": 32})
    result = recover_cli(raw, legacy_diff, tmp_path / "out")
    assert_refused(
        result,
        1,
        "raw looks like a model (hidden 32, vocab 320), diff like a model (hidden 64, vocab 321)",
        tmp_path / "out",
    )


def test_missing_layers_are_named(build_pair, legacy_diff, tmp_path):
    raw, _ = build_pair(config_overrides={"num_hidden_layers": 1})
    result = recover_cli(raw, legacy_diff, tmp_path / "out")
    assert_refused(result, 1, "9 diff tensors have no raw counterpart (first: model.layers.1.", tmp_path / "out")
    assert "different numbers of layers" in result.output


# --- refusals that lose nothing -----------------------------------------------------------------------------------


def test_a_non_empty_output_is_refused_untouched(pair, made_diff, tmp_path):
    raw, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = recover_cli(raw, made_diff, out)
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    refused = recover_cli(raw, made_diff, out, "--overwrite")  # not an output of ours: --overwrite keeps it too
    assert refused.exit_code == 2 and "--overwrite will not empty it" in refused.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["inside-diff", "is-diff", "holds-raw"])
def test_an_output_that_is_in_or_holds_an_input_is_refused_even_with_overwrite(
    pair, made_diff, copy_dir, tmp_path, where
):
    raw, _ = pair
    diff = copy_dir(made_diff)
    raw_copy = copy_dir(raw, "raw")
    out = {"inside-diff": diff / "tuned", "is-diff": diff, "holds-raw": tmp_path}[where]
    before = snapshot(diff), snapshot(raw_copy)
    result = recover_cli(raw_copy, diff, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "the output is, or lies inside, the input" in result.output or "the output holds the input" in result.output
    assert (snapshot(diff), snapshot(raw_copy)) == before


def test_not_enough_disk_is_refused_before_any_write(pair, made_diff, tmp_path, monkeypatch):
    raw, _ = pair
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: os.statvfs_result((0,) * 10) and _Usage(1000))
    result = recover_cli(raw, made_diff, tmp_path / "out")
    assert result.exit_code == 1
    assert "not enough free disk: the output needs" in result.output and "has 0.00 MB free" in result.output
    assert not (tmp_path / "out").exists()


class _Usage:
    def __init__(self, free):
        self.free, self.total, self.used = free, free, 0


def test_a_disk_filling_up_stops_cleanly_and_resume_finishes(pair, made_diff, tmp_path, monkeypatch):
    raw, _ = pair
    reference = tmp_path / "reference"
    recover(raw, made_diff, reference, max_shard_size="100KB")
    free_space = fill_disk_after(monkeypatch, 250_000)
    out = tmp_path / "out"
    result = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB")
    assert result.exit_code == 1 and "disk full while writing " in result.output  # a shard or the journal
    assert "free space and run again with --resume" in result.output
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))
    kept = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert kept and len(kept) < len(list(reference.glob("model-*.safetensors")))

    free_space()
    resumed = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB", "--resume")
    assert resumed.exit_code == 0, resumed.output
    # Shards journaled before the disk filled are kept (the journal itself may have missed the last one).
    kept_again = int(resumed.output.split(" kept from the interrupted run")[0].rsplit(", ", 1)[1])
    assert 1 <= kept_again <= len(kept)
    assert snapshot(out) == snapshot(reference) | {}  # byte-identical to an uninterrupted run


def test_a_disk_failing_mid_run_names_the_file_and_resume_finishes(pair, made_diff, tmp_path, monkeypatch):
    # An I/O error (a failing disk, a folder made read-only) once said only "error: Input/output error".
    raw, _ = pair
    reference = tmp_path / "reference"
    recover(raw, made_diff, reference, max_shard_size="100KB")
    repaired = fill_disk_after(monkeypatch, 250_000, files=".safetensors.partial", error=errno.EIO)
    out = tmp_path / "out"
    result = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert re.search(
        r"model-\d+-of-\d+\.safetensors: Input/output error while writing it; the shards finished before "
        r"were kept: once that is fixed, run the same command with --resume",
        result.output,
    ), result.output
    assert not list(out.glob("*.partial"))
    repaired()
    resumed = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert snapshot(out) == snapshot(reference)


def test_an_interrupted_run_leaves_no_model_and_resume_gives_the_identical_result(pair, made_diff, tmp_path):
    raw, _ = pair
    reference = tmp_path / "reference"
    recover(raw, made_diff, reference, max_shard_size="100KB")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(raw, made_diff, out, max_shard_size="100KB", progress=interrupt_after(300_000))
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))
    assert (out / output.JOURNAL_NAME).is_file()
    with pytest.raises(Exception, match="other inputs or options"):
        recover(raw, made_diff, out, max_shard_size="200KB", resume=True)
    report = recover(raw, made_diff, out, max_shard_size="100KB", resume=True)
    assert report.resumed_shards >= 2 and report.verified
    assert snapshot(out) == snapshot(reference)


def test_resume_with_nothing_to_resume_is_a_usage_error(pair, made_diff, tmp_path):
    raw, _ = pair
    result = recover_cli(raw, made_diff, tmp_path / "fresh", "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_make_diff_resumes_with_a_complete_manifest(pair, tmp_path):
    from weight_diff.jobs import make_diff

    raw, tuned = pair
    make_diff(raw, tuned, tmp_path / "reference", max_shard_size="100KB")
    with pytest.raises(KeyboardInterrupt):
        make_diff(raw, tuned, tmp_path / "diff", max_shard_size="100KB", progress=interrupt_after(300_000))
    report = make_diff(raw, tuned, tmp_path / "diff", max_shard_size="100KB", resume=True)
    assert report.resumed_shards >= 2
    ours = json.loads((tmp_path / "diff" / "weight-diff-manifest.json").read_text())
    reference = json.loads((tmp_path / "reference" / "weight-diff-manifest.json").read_text())
    assert ours["tensors"] == reference["tensors"]


SLOW_RECOVER = """
import sys, time
from weight_diff import writer
real = writer.ShardWriter.write
def slow(self, data):
    time.sleep(0.02)
    return real(self, data)
writer.ShardWriter.write = slow
from weight_diff.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_running_recovery_within_seconds_and_resume_finishes(pair, made_diff, tmp_path, signum):
    raw, _ = pair
    out = tmp_path / "out"
    args = [
        "recover",
        "--path_raw",
        str(raw),
        "--path_diff",
        str(made_diff),
        "--path_tuned",
        str(out),
        "--max-shard-size",
        "20KB",
        "--quiet",
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_RECOVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    journal = out / output.JOURNAL_NAME
    while time.monotonic() < deadline and not (journal.is_file() and '.safetensors"' in journal.read_text()):
        time.sleep(0.01)  # until a finished shard is journaled
    assert process.poll() is None, "the run finished before it could be interrupted"
    sent = time.monotonic()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == 130
    assert (
        stderr.strip()
        == "error: interrupted; finished shards were kept. Run the same command with --resume to continue"
    )
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))
    resumed = subprocess.run(
        [sys.executable, "-m", "weight_diff.cli", *args, "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from the interrupted run" in resumed.stdout and "verified: 21 tensors" in resumed.stdout


# As SLOW_RECOVER, and the interpreter's shutdown takes a while (as torch's atexit work can), so that a second
# signal sent once the error line is out lands during it.
SLOW_RECOVER_AND_EXIT = SLOW_RECOVER.replace(
    "from weight_diff.cli import main",
    "import atexit\natexit.register(time.sleep, 1.0)\nfrom weight_diff.cli import main",
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_the_stopped_run_exits_prints_no_traceback(pair, made_diff, tmp_path, signum):
    raw, _ = pair
    out = tmp_path / "out"
    args = ["recover", "--path_raw", str(raw), "--path_diff", str(made_diff), "--path_tuned", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_RECOVER_AND_EXIT, *args, "--max-shard-size", "20KB", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = out / output.JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.is_file() and '.safetensors"' in journal.read_text()):
        time.sleep(0.01)
    process.send_signal(signum)
    first = process.stderr.readline()  # the run has stopped and cleaned up; the interpreter is exiting
    process.send_signal(signum)
    rest = process.stderr.read()
    process.wait(timeout=30)
    assert first.startswith("error: interrupted; finished shards were kept")
    assert rest == "" and process.returncode == 130
    assert not list(out.glob("*.partial"))
    resumed = subprocess.run(
        [sys.executable, "-m", "weight_diff.cli", *args, "--max-shard-size", "20KB", "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0 and "verified: 21 tensors" in resumed.stdout, resumed.stderr


# A Ctrl-C while torch is still being imported (the first second of a run): torch cannot be imported again after.
STOPPED_IN_TORCH_IMPORT = """
import sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "torch.fx":
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
sys.meta_path.insert(0, Stop())
from weight_diff.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("command", ["recover", "make-diff"])
def test_a_ctrl_c_while_the_libraries_load_is_one_line_and_status_130(pair, made_diff, tmp_path, command):
    raw, tuned = pair
    out = tmp_path / "out"
    second = ["--path_diff", made_diff, "--path_tuned", out] if command == "recover" else ["--path_tuned", tuned]
    args = [command, "--path_raw", raw, *second, *(["--path_diff", out] if command == "make-diff" else [])]
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_IN_TORCH_IMPORT, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "error: interrupted before anything was written; run the same command again"
    assert not out.exists()


CTRL_C_SWALLOWED_IN_TORCH_IMPORT = """
import os, signal, sys, time
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch.fx":
            sys.meta_path.remove(self)
            try:  # as compiled code that initialises a module may do with an exception raised in it
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            except BaseException:
                pass
sys.meta_path.insert(0, CtrlC())
from weight_diff.cli import main
main(sys.argv[1:])
"""


CTRL_C_TWICE_WHILE_TORCH_LOADS = """
import os, signal, sys, time
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch.fx":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: a load that hangs need not be waited for
            time.sleep(30)
sys.meta_path.insert(0, CtrlC())
from weight_diff.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "script", [CTRL_C_SWALLOWED_IN_TORCH_IMPORT, CTRL_C_TWICE_WHILE_TORCH_LOADS], ids=["once", "twice"]
)
def test_a_ctrl_c_while_torch_loads_is_held_until_it_has_loaded_and_a_second_stops_at_once(
    pair, made_diff, tmp_path, script
):
    # A KeyboardInterrupt raised inside a library's initialisation crashed the interpreter, or was lost there and
    # the run went on to the end. The signal is now held while the libraries load, then stops the run; a second
    # one stops at once (a load that hangs need not be waited for).
    raw, _ = pair
    out = tmp_path / "out"
    args = ["recover", "--path_raw", raw, "--path_diff", made_diff, "--path_tuned", out]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and time.monotonic() - started < 25, (done.returncode, done.stderr)
    assert done.stderr.splitlines() == [
        "stopping once the libraries have loaded (press Ctrl-C again to stop now)",
        "error: interrupted before anything was written; run the same command again",
    ]
    assert not out.exists()


def interrupt_once_created(monkeypatch, nth: int) -> None:
    """Raise KeyboardInterrupt (as a Ctrl-C would) just after the ``nth`` file of a run is created under its
    ``.partial`` name, before the writer that made it can take charge of it: the worst moment for cleanup."""
    real_init = writer.StagedFile.__init__
    created = {"files": 0}

    def init(self, path, *args, **kwargs):
        real_init(self, path, *args, **kwargs)
        created["files"] += 1
        if created["files"] == nth:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer.StagedFile, "__init__", init)


@pytest.mark.parametrize("diff_format", ["float32", "compact"])
def test_a_ctrl_c_as_a_file_is_created_leaves_no_partial_file_and_resume_finishes(
    pair, tmp_path, monkeypatch, diff_format
):
    from weight_diff.jobs import make_diff

    raw, tuned = pair
    reference = tmp_path / "reference"
    make_diff(raw, tuned, reference, diff_format=diff_format, max_shard_size="100KB")
    diff = tmp_path / "diff"
    with monkeypatch.context() as patched:
        interrupt_once_created(patched, 2)
        with pytest.raises(KeyboardInterrupt):
            make_diff(raw, tuned, diff, diff_format=diff_format, max_shard_size="100KB")
    assert not list(diff.glob("*.partial")) and (diff / output.JOURNAL_NAME).is_file()
    make_diff(raw, tuned, diff, diff_format=diff_format, max_shard_size="100KB", resume=True)
    assert snapshot(diff) == snapshot(reference)

    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        interrupt_once_created(patched, 2)
        with pytest.raises(KeyboardInterrupt):
            recover(raw, diff, out, max_shard_size="100KB")
    assert not list(out.glob("*.partial")) and not (out / "config.json").exists()
    report = recover(raw, diff, out, max_shard_size="100KB", resume=True)
    assert report.resumed_shards >= 1 and report.verified


# --- a refused run leaves the output as it found it ---------------------------------------------------------------


@pytest.fixture
def made_compact(pair, tmp_path_factory):
    from weight_diff.jobs import make_diff

    raw, tuned = pair
    diff = tmp_path_factory.mktemp("compact") / "diff"
    make_diff(raw, tuned, diff, diff_format="compact")
    return diff


@pytest.mark.parametrize("kind", ["float32", "compact"])
def test_a_run_refused_at_its_first_tensor_leaves_no_directory_and_the_same_command_then_works(
    build_pair, pair, made_diff, made_compact, tmp_path, kind
):
    other_raw, _ = build_pair(seed=7)
    diff = made_diff if kind == "float32" else made_compact
    out = tmp_path / "new" / "nested" / "out"
    refused = recover_cli(other_raw, diff, out)
    assert refused.exit_code == 1 and "No model was written" in refused.output, refused.output
    assert not (tmp_path / "new").exists()  # the directories it made are gone with it
    again = recover_cli(pair[0], diff, out)  # the corrected command, as it was: no --resume, no --overwrite
    assert again.exit_code == 0 and "verified" in again.output, again.output


@pytest.mark.parametrize("kind", ["float32", "compact"])
def test_overwrite_refused_at_its_first_tensor_keeps_the_earlier_model_byte_for_byte(
    build_pair, pair, made_diff, made_compact, tmp_path, kind
):
    other_raw, _ = build_pair(seed=7)
    diff = made_diff if kind == "float32" else made_compact
    out = tmp_path / "out"
    assert recover_cli(pair[0], diff, out, "--max-shard-size", "100KB").exit_code == 0
    before = snapshot(out)
    refused = recover_cli(other_raw, diff, out, "--overwrite")
    assert refused.exit_code == 1 and "No model was written" in refused.output, refused.output
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)  # nothing hidden left behind
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_overwrite_interrupted_before_its_first_shard_leaves_the_earlier_model_as_it_was(pair, made_diff, tmp_path):
    out = tmp_path / "out"
    recover(pair[0], made_diff, out, max_shard_size="100KB")
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        recover(pair[0], made_diff, out, overwrite=True, progress=interrupt_after(0))
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)  # no journal, no aside
    report = recover(pair[0], made_diff, out, overwrite=True)  # the same command again
    assert report.verified and not (out / output.ASIDE_NAME).exists()
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_an_interruption_says_resume_only_where_there_is_a_run_to_resume(pair, made_diff, tmp_path, monkeypatch):
    from weight_diff import compare
    from weight_diff.checkpoint import Checkpoint

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare_models", stop)
    result = run("compare", pair[0], pair[1])
    assert result.exit_code == 130 and result.output.strip() == "error: interrupted"
    monkeypatch.setattr(Checkpoint, "open", stop)  # before the output is made
    out = tmp_path / "out"
    result = recover_cli(pair[0], made_diff, out)
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "error: interrupted before anything was written; run the same command again"
    assert not out.exists()


@pytest.mark.parametrize("edited", ["generation_config.json", "config.json"])
def test_overwrite_keeps_a_file_of_ours_that_was_edited_since_and_says_so(pair, made_diff, tmp_path, edited):
    """Found by a review: --overwrite replaced a config the user had edited after the run (verify had just
    reported it changed)."""
    out = tmp_path / "out"
    assert recover_cli(pair[0], made_diff, out).exit_code == 0
    assert edited in (out / "SHA256SUMS").read_text()
    (out / edited).write_text('{"edited": "by hand"}\n')
    before = snapshot(out)
    result = recover_cli(pair[0], made_diff, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert f"{edited} was changed after weight-diff wrote it" in result.output
    assert snapshot(out) == before


def test_resume_and_overwrite_together_are_refused_before_anything_changes(pair, made_diff, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(pair[0], made_diff, out, max_shard_size="100KB", progress=interrupt_after(300_000))
    before = snapshot(out)
    result = recover_cli(pair[0], made_diff, out, "--max-shard-size", "100KB", "--resume", "--overwrite")
    assert result.exit_code == 2 and "--resume and --overwrite ask for opposite things" in result.output
    assert snapshot(out) == before


def test_a_dangling_link_as_output_and_a_file_as_demo_folder_are_named(pair, made_diff, tmp_path):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    result = recover_cli(pair[0], made_diff, link)
    assert result.exit_code == 1 and f"a link to {tmp_path / 'nowhere'}, which does not exist" in result.output
    (tmp_path / "a-file").write_text("x")
    result = run("demo", "--keep", tmp_path / "a-file")
    assert result.exit_code == 1 and "exists and is not a directory; give --keep a new directory" in result.output
    assert (tmp_path / "a-file").read_text() == "x" and not (tmp_path / "nowhere").exists()


def test_overwrite_never_removes_a_folder_named_like_its_aside_that_holds_a_users_files(pair, made_diff, tmp_path):
    out = tmp_path / "out"
    assert recover_cli(pair[0], made_diff, out).exit_code == 0
    mine = out / output.ASIDE_NAME
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = recover_cli(pair[0], made_diff, out, "--overwrite")
    assert result.exit_code == 2 and f"{mine}: holds notes.txt, which weight-diff did not write" in result.output
    assert (mine / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()


def test_overwrite_stopped_while_setting_the_earlier_output_aside_puts_it_back(
    build_pair, pair, made_diff, tmp_path, monkeypatch
):
    """Found by a review: a stop between moving the earlier output aside and writing the journal left a directory
    every later command refused, the earlier model hidden. Ctrl-C puts it back; after a kill (no handler runs),
    the next --overwrite finishes moving it and a refusal then puts it all back."""
    out = tmp_path / "out"
    assert recover_cli(pair[0], made_diff, out, "--max-shard-size", "100KB").exit_code == 0
    before = snapshot(out)
    real_rename, calls = os.rename, {"n": 0}

    def rename_then_stop(source, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(output.os, "rename", rename_then_stop)
    stopped = recover_cli(pair[0], made_diff, out, "--overwrite")
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert stopped.exit_code == 130 and "interrupted before anything was written" in stopped.output
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)

    calls["n"] = 0  # as if killed: the move stops half-way and nothing cleans up
    monkeypatch.setattr(output.os, "rename", rename_then_stop)
    with pytest.raises(KeyboardInterrupt):
        output.set_aside(out)
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert (out / output.ASIDE_NAME).is_dir() and not (out / "config.json").exists()
    for command in ("verify", "inspect"):  # what is left is not a whole model: they say what to do
        said = run(command, out)
        assert said.exit_code == 2 and "after --overwrite, the same command again" in said.output, said.output
    other_raw, _ = build_pair(seed=7)
    refused = recover_cli(other_raw, made_diff, out, "--overwrite")
    assert refused.exit_code == 1 and "No model was written" in refused.output, refused.output
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)
    assert recover_cli(pair[0], made_diff, out, "--overwrite").exit_code == 0


def test_a_finished_output_and_an_interrupted_overwrite_each_say_the_way_out(pair, made_diff, tmp_path, monkeypatch):
    # A finished output was refused with "add --resume", and --resume then said "nothing to resume"; a run
    # started with --overwrite and interrupted advised "the same command with --resume", which is refused.
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "100KB").exit_code == 0
    again = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB")
    assert again.exit_code == 2 and "holds a finished output of weight-diff" in again.output, again.output
    assert f"weight-diff verify {out}" in again.output and "--resume" not in again.output
    interrupt_once_created(monkeypatch, 3)  # after two shards of the new run
    stopped = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB", "--overwrite")
    assert stopped.exit_code == 130, stopped.output
    assert "Run the same command with --resume in place of --overwrite to continue" in stopped.output
    monkeypatch.undo()
    held = recover_cli(raw, made_diff, out, "--max-shard-size", "100KB")
    assert held.exit_code == 2 and "holds an interrupted run; add --resume to finish it" in held.output, held.output
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "100KB", "--resume").exit_code == 0
