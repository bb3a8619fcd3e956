"""Hostile and careless input, built in-process: every case is one clear line, a non-zero status, no traceback,
and the inputs and the current directory byte-for-byte unchanged (issue 10)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Every case runs in a current directory holding the user's files, which must be byte-for-byte unchanged after."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("the user's own file")
    (cwd / "sub").mkdir()
    (cwd / "sub" / "more.txt").write_text("also the user's")
    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    yield cwd
    assert snapshot(cwd) == before and sorted(os.listdir(cwd)) == ["notes.txt", "sub"], "the current directory changed"


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


# --- no silent wrong values from .bin: every offset proved against the archive's records --------------------------


def _rezip(path: Path, transform) -> None:
    """Rewrite a torch.save archive record by record (stored, uncompressed), letting ``transform`` change them."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    records = transform(records)
    path.unlink()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, data)


def _bin_model(directory: Path) -> dict[str, torch.Tensor]:
    from weight_diff.tiny_llama import save_checkpoint

    generator = torch.Generator().manual_seed(7)
    state = {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=generator),
        "model.norm.weight": torch.ones(4) + torch.randn(4, generator=generator) * 0.1,
        "lm_head.weight": torch.randn(8, 4, generator=generator),
    }
    save_checkpoint(state, directory, fmt="bin")
    return state


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    from conftest import load_tensors

    return load_tensors(directory)


def test_an_unreferenced_record_before_the_data_does_not_shift_the_offsets(tmp_path):
    state = _bin_model(tmp_path)
    prefix = "pytorch_model/"

    def add_unreferenced(records):
        prefix_name = records[0][0].split("/")[0]
        return [(f"{prefix_name}/data/999", b"\x7f" * 40)] + records

    _rezip(tmp_path / "pytorch_model.bin", add_unreferenced)
    reference = torch.load(tmp_path / "pytorch_model.bin", weights_only=True, mmap=True)  # what torch reads
    read = _read_all(tmp_path)
    assert prefix and set(read) == set(state)
    for name in state:
        assert torch.equal(read[name], reference[name]) and torch.equal(read[name], state[name]), name


@pytest.mark.parametrize(
    "damage, message",
    [
        ("short-record", "its record only"),
        ("missing-record", "which the archive lacks"),
        ("deflated-record", "compressed"),
        ("big-endian", "big-endian"),
        ("no-pickle", "no data.pkl"),
        ("garbage-pickle", "not a readable PyTorch checkpoint"),
    ],
)
def test_a_bin_whose_offsets_cannot_be_proved_is_refused(pair, tmp_path, damage, message):
    import zipfile

    raw, _ = pair
    diff = tmp_path / "diff"
    _bin_model(diff)
    (diff / "config.json").write_text("{}")
    path = diff / "pytorch_model.bin"

    def change(records):
        out = []
        for name, data in records:
            if name.endswith("/data/0"):
                if damage == "short-record":
                    data = data[: len(data) // 2]
                elif damage == "missing-record":
                    continue
            if damage == "big-endian" and name.endswith("/byteorder"):
                data = b"big"
            if damage == "no-pickle" and name.endswith("/data.pkl"):
                continue
            if damage == "garbage-pickle" and name.endswith("/data.pkl"):
                data = b"\x80\x02}q\x00(X" + b"\xff" * 30
            out.append((name, data))
        return out

    _rezip(path, change)
    if damage == "deflated-record":
        with zipfile.ZipFile(path) as archive:
            records = [(i.filename, archive.read(i)) for i in archive.infolist()]
        path.unlink()
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in records:
                kind = zipfile.ZIP_DEFLATED if name.endswith("/data/0") else zipfile.ZIP_STORED
                archive.writestr(name, data, compress_type=kind)
    before = snapshot(diff)
    result = run("inspect", diff, "--no-hash")
    assert_one_line_refusal(result, 1, message)
    assert snapshot(diff) == before


def test_a_tensor_in_two_shards_is_taken_from_the_one_the_index_names(tmp_path):
    from weight_diff.tiny_llama import save_checkpoint

    state = {"a.weight": torch.arange(6.0).view(2, 3), "model.norm.weight": torch.ones(3)}
    save_checkpoint(state, tmp_path, fmt="bin", shards=2)
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    # The second shard also holds a.weight, with other values; the index says it lives in the first.
    index["weight_map"]["a.weight"] = first
    torch.save({"a.weight": torch.full((2, 3), -1.0), "model.norm.weight": torch.ones(3)}, tmp_path / second)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    read = _read_all(tmp_path)
    assert torch.equal(read["a.weight"], state["a.weight"])


def test_a_tensor_in_two_shards_that_no_index_names_is_refused(tmp_path):
    from safetensors.torch import save_file

    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": torch.arange(6.0).view(2, 3), "c.weight": torch.ones(2)}, str(tmp_path / first))
    save_file({"a.weight": torch.zeros(2, 3), "model.norm.weight": torch.ones(3)}, str(tmp_path / second))
    index = {"metadata": {}, "weight_map": {"c.weight": first, "model.norm.weight": second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run("inspect", tmp_path, "--no-hash")
    assert_one_line_refusal(result, 1, "tensor a.weight is in both")


# --- safetensors: as strict as the library, no stricter ------------------------------------------------------------


def _safetensors(header: dict | bytes, data: bytes, *, pad: bool = True) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body + data


_F = {"dtype": "F32"}
D8 = bytes(range(8))
SAFETENSORS_CASES = {
    "valid": (_safetensors({"a": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8), True),
    "unpadded-header": (_safetensors({"a": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8, pad=False), True),
    "unaligned-offset": (
        _safetensors(
            {
                "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                "a": {**_F, "shape": [2], "data_offsets": [1, 9]},
            },
            D8 + b"\x09",
        ),
        True,
    ),
    "overlap": (
        _safetensors(
            {"a": {**_F, "shape": [2], "data_offsets": [0, 8]}, "b": {**_F, "shape": [1], "data_offsets": [4, 8]}}, D8
        ),
        False,
    ),
    "gap": (_safetensors({"a": {**_F, "shape": [1], "data_offsets": [4, 8]}}, D8), False),
    "trailing-bytes": (_safetensors({"a": {**_F, "shape": [1], "data_offsets": [0, 4]}}, D8), False),
    "duplicate-key": (
        _safetensors(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
            D8 + D8,
        ),
        False,
    ),
    "duplicate-key-same": (
        _safetensors(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            D8,
        ),
        True,
    ),
    "negative-dim": (_safetensors({"a": {**_F, "shape": [-2], "data_offsets": [0, 8]}}, D8), False),
    "float-dim": (_safetensors({"a": {**_F, "shape": [2.0], "data_offsets": [0, 8]}}, D8), False),
    "bool-dim": (_safetensors({"a": {**_F, "shape": [True, 2], "data_offsets": [0, 8]}}, D8), False),
    "string-dim": (_safetensors({"a": {**_F, "shape": ["2"], "data_offsets": [0, 8]}}, D8), False),
    "float-offset": (_safetensors({"a": {**_F, "shape": [2], "data_offsets": [0.0, 8]}}, D8), False),
    "begin-after-end": (_safetensors({"a": {**_F, "shape": [0], "data_offsets": [8, 0]}}, D8), False),
    "three-offsets": (_safetensors({"a": {**_F, "shape": [2], "data_offsets": [0, 8, 8]}}, D8), False),
    "overflowing-shape": (_safetensors({"a": {**_F, "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, D8), False),
    "dim-2^64": (_safetensors({"a": {**_F, "shape": [0, 2**64], "data_offsets": [0, 0]}}, b""), False),
    "metadata-not-strings": (
        _safetensors({"__metadata__": {"a": 1}, "a": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8),
        False,
    ),
    "entry-extra-key": (_safetensors({"a": {**_F, "shape": [2], "data_offsets": [0, 8], "x": 1}}, D8), True),
    "leading-spaces": (_safetensors(b'   {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8), True),
    "not-utf8": (_safetensors(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8), False),
    "nested": (_safetensors(b"[" * 50000 + b"]" * 50000, b""), False),
    "infinite-number": (_safetensors(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e999]}}', D8), False),
    "header-is-list": (_safetensors(b"[]", b""), False),
    "entry-is-string": (_safetensors({"a": "F32"}, D8), False),
    "truncated": (_safetensors({"a": {**_F, "shape": [4], "data_offsets": [0, 16]}}, D8), False),
    "scalar": (_safetensors({"a": {**_F, "shape": [], "data_offsets": [0, 4]}}, D8[:4]), True),
    "metadata-null": (
        _safetensors({"__metadata__": None, "a": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8),
        True,
    ),
    "metadata-list": (_safetensors({"__metadata__": [], "a": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8), False),
    "dtype-lowercase": (_safetensors({"a": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}}, D8), False),
    "dtype-U16": (_safetensors({"a": {"dtype": "U16", "shape": [4], "data_offsets": [0, 8]}}, D8), True),
    "no-shape": (_safetensors({"a": {**_F, "data_offsets": [0, 8]}}, D8), False),
    "shape-null": (_safetensors({"a": {**_F, "shape": None, "data_offsets": [0, 8]}}, D8), False),
    "header-length-0": ((0).to_bytes(8, "little"), False),
    "header-trailing-garbage": (_safetensors(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} x', D8), False),
    "header-nul-padded": (
        (64).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.ljust(64, b"\0") + D8,
        False,
    ),
    "name-with-newline": (_safetensors({"a\nb": {**_F, "shape": [2], "data_offsets": [0, 8]}}, D8), True),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_headers_are_judged_as_the_library_judges_them(tmp_path, case):
    from safetensors import SafetensorError, safe_open

    from weight_diff.checkpoint import Checkpoint, read_safetensors_header
    from weight_diff.errors import CheckpointError

    blob, valid = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    try:  # the reference: what the safetensors library itself makes of the file
        with safe_open(str(path), "pt") as reference:
            expected = {name: reference.get_tensor(name) for name in reference.keys()}  # noqa: SIM118
    except SafetensorError:
        expected = None
    assert (expected is not None) == valid, "the case's expectation disagrees with the library"
    if expected is None:
        with pytest.raises(CheckpointError):
            read_safetensors_header(path)
        result = run("inspect", tmp_path, "--no-hash")
        assert_one_line_refusal(result, 1, str(path))
        return
    with Checkpoint.open(tmp_path) as checkpoint:
        read = {name: checkpoint.read_rows(info, 0, info.rows).clone() for name, info in checkpoint.tensors.items()}
    assert read.keys() == expected.keys()
    for name in expected:
        assert torch.equal(read[name].reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8))


# --- no hang and no huge allocation from a tiny file --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.0.mlp.up_proj.weight", [0, 2**62]),
        ("model.layers.0.mlp.up_proj.weight", [0, 2**40]),
        ("model.layers.0.mlp.up_proj.weight", [2**40, 0]),
        ("model.layers.0.mlp.up_proj.weight", [2**62, 0, 3]),
        ("model.layers.0.mlp.up_proj.weight", [160, 0]),  # zero width
        ("model.embed_tokens.weight", [0, 64]),  # an embedding with no rows
    ],
    ids=str,
)
@pytest.mark.parametrize("command", ["recover", "make-diff", "inspect", "compare", "verify-diff"])
def test_a_zero_size_tensor_is_refused_without_hanging(pair, made_diff, copy_dir, tmp_path, name, shape, command):
    from safetensors.torch import load_file, save_file

    raw, tuned = pair
    victim = copy_dir(made_diff if command in ("recover", "verify-diff") else raw, "victim")
    index_path = victim / "model.safetensors.index.json"
    shard_name = json.loads(index_path.read_text())["weight_map"][name] if index_path.exists() else "model.safetensors"
    tensors = load_file(victim / shard_name)
    tensors.pop(name)
    save_file(tensors, str(victim / shard_name))
    # add the empty tensor by hand: torch cannot allocate a [0, 2**62] tensor's strides for save_file
    blob = (victim / shard_name).read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
    (victim / shard_name).write_bytes(_safetensors(header, blob[8 + header_len :]))
    before = snapshot(victim)
    out = tmp_path / "out"
    args = {
        "recover": ["recover", "--path_raw", raw, "--path_diff", victim, "--path_tuned", out, "--quiet"],
        "make-diff": ["make-diff", "--path_raw", victim, "--path_tuned", tuned, "--path_diff", out, "--quiet"],
        "inspect": ["inspect", victim, "--no-hash"],
        "compare": ["compare", victim, raw, "--quiet"],
        "verify-diff": ["verify", victim],
    }[command]
    result = run(*args)
    assert_one_line_refusal(result, 2 if command == "compare" else 1, f"tensor {name} has no values")
    assert snapshot(victim) == before and not out.exists()


# --- bad input is a clear refusal, never "unexpected error ... report it" -----------------------------------------

NESTED = "[" * 100000 + "]" * 100000


def _edit_json(path: Path, change) -> None:
    body = json.loads(path.read_text())
    path.write_text(change(body) if callable(change) else change)


def _manifest_edit(change):
    def edit(body):
        change(body)
        return json.dumps(body)

    return edit


def _first_record(body):
    return next(iter(body["tensors"].values()))


BAD_DIFF_FILES = {
    "index-nested": ("model.safetensors.index.json", NESTED, "nested too deeply"),
    "index-1e999": (
        "model.safetensors.index.json",
        lambda body: json.dumps(body).replace('"total_size": ', '"total_size": 1e999, "x": '),
        "out of range",
    ),
    "index-NaN": ("model.safetensors.index.json", lambda body: json.dumps(body).replace("{", '{"x": NaN, ', 1), "NaN"),
    "index-weight_map-list": ("model.safetensors.index.json", '{"weight_map": ["a"]}', "weight_map is missing"),
    "index-is-list": ("model.safetensors.index.json", "[1]", "weight_map is missing"),
    "index-not-utf8": ("model.safetensors.index.json", b'{"weight_map": {"\xff": 1}}', "not UTF-8"),
    "manifest-nested": ("weight-diff-manifest.json", NESTED, "nested too deeply"),
    "manifest-1e999": (
        "weight-diff-manifest.json",
        lambda body: json.dumps(body).replace('"shape": [', '"shape": [1e999, ', 1),
        "out of range",
    ),
    "manifest-tensors-list": (
        "weight-diff-manifest.json",
        _manifest_edit(lambda body: body.update(tensors=[1, 2])),
        "must be JSON objects",
    ),
    "manifest-record-missing-part": (
        "weight-diff-manifest.json",
        _manifest_edit(lambda body: _first_record(body).pop("raw")),
        "is malformed",
    ),
    "manifest-sha-int": (
        "weight-diff-manifest.json",
        _manifest_edit(lambda body: _first_record(body)["raw"].update(sha256=5)),
        "is malformed",
    ),
    "manifest-shape-strings": (
        "weight-diff-manifest.json",
        _manifest_edit(lambda body: _first_record(body)["diff"].update(shape=["2"])),
        "is malformed",
    ),
    "manifest-version-list": (
        "weight-diff-manifest.json",
        _manifest_edit(lambda body: body.update(version=[1])),
        "this tool reads version 1",
    ),
    "manifest-is-string": ("weight-diff-manifest.json", '"hello"', "not a weight-diff manifest"),
    "config-nested": ("config.json", '{"a": ' + NESTED + "}", "nested too deeply"),
    "config-1e999": ("config.json", '{"rms_norm_eps": 1e999}', "out of range"),
    "config-NaN": ("config.json", '{"rms_norm_eps": NaN}', "NaN is not a JSON number"),
}


@pytest.mark.parametrize("case", list(BAD_DIFF_FILES))
def test_a_damaged_json_file_in_the_diff_is_one_clear_line(pair, made_diff, copy_dir, tmp_path, case):
    raw, _ = pair
    diff = copy_dir(made_diff)
    name, change, message = BAD_DIFF_FILES[case]
    path = diff / name
    if name == "config.json":  # without checksums, so that the file itself is what gets refused
        (diff / "SHA256SUMS").unlink()
        _edit_json(diff / "weight-diff-manifest.json", _manifest_edit(lambda body: body.pop("files")))
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        _edit_json(path, change)
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_one_line_refusal(result, 1, message)
    assert snapshot(diff) == before and not (tmp_path / "out").exists()


def test_a_broken_tokenizer_config_refuses_the_run_before_any_shard_is_written(pair, legacy_diff, copy_dir, tmp_path):
    raw, _ = pair
    diff = copy_dir(legacy_diff)  # no checksums to catch it first
    (diff / "tokenizer_config.json").write_text('{"model_max_length": 2048,')  # cut short
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out", "--chat-template", "open-instruct")
    assert_one_line_refusal(result, 1, "tokenizer_config.json: unreadable")
    assert snapshot(diff) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe{{ messages }}", b"{{ messages }}\x80"])
def test_a_chat_template_that_is_not_utf8_is_refused(pair, made_diff, tmp_path, content):
    raw, _ = pair
    template = tmp_path / "template.jinja"
    template.write_bytes(content)
    result = recover_cli(raw, made_diff, tmp_path / "out", "--chat-template", template)
    assert_one_line_refusal(result, 2, "not UTF-8 text")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"\xff" * 64 + b"  model.safetensors\n", "é".encode("latin-1") * 3])
def test_a_sha256sums_that_is_not_utf8_is_refused(pair, made_diff, tmp_path, content):
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out).exit_code == 0
    (out / "SHA256SUMS").write_bytes(content)
    assert_one_line_refusal(run("verify", out), 1, "not UTF-8 text")


def test_a_damaged_resume_journal_is_one_clear_line(pair, made_diff, tmp_path):
    from weight_diff.output import JOURNAL_NAME

    raw, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL_NAME).write_text(NESTED)
    result = recover_cli(raw, made_diff, out, "--resume")
    assert_one_line_refusal(result, 2, "unreadable; start again with --overwrite")
    (out / JOURNAL_NAME).write_text('{"fingerprint": "x", "shards": {"a": 1}, "tensors": {}}')
    assert_one_line_refusal(recover_cli(raw, made_diff, out, "--resume"), 2, "unreadable")


def test_compare_of_two_models_that_differ_exits_1_with_its_report(pair):
    raw, tuned = pair
    result = run("compare", raw, tuned, "--quiet")
    assert result.exit_code == 1, result.output
    assert "DIFFER:" in result.output and "unexpected" not in result.output and "report it" not in result.output


# --- SHA256SUMS escaped as coreutils escapes it --------------------------------------------------------------------

ODD_NAMES = [
    "new\nline",
    "back\\slash",
    "cr\rx",
    "*star",
    " space",
    "tab\tname",
    "é-accent",
    "fs\x1csep",
    "\\n-literal",
]


def _odd_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "odd"
    directory.mkdir()
    for number, name in enumerate(ODD_NAMES):
        (directory / name).write_bytes(f"file {number}".encode())
    return directory


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils sha256sum not installed")
def test_odd_file_names_round_trip_through_our_sums_and_coreutils(tmp_path):
    import hashlib
    import subprocess

    from weight_diff.manifest import format_sums
    from weight_diff.verify import check_sums

    directory = _odd_directory(tmp_path)
    sums = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in ODD_NAMES}
    (directory / "SHA256SUMS").write_text(format_sums(sums))
    checked = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=directory, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checks, notes = check_sums(directory)
    assert sorted(c.subject for c in checks) == sorted(ODD_NAMES) and all(c.ok for c in checks) and not notes
    for flag in ("--text", "--binary"):  # and what coreutils writes, we read
        written = subprocess.run(["sha256sum", flag, "--", *ODD_NAMES], cwd=directory, capture_output=True, check=True)
        (directory / "SHA256SUMS").write_bytes(written.stdout)
        checks, notes = check_sums(directory)
        assert sorted(c.subject for c in checks) == sorted(ODD_NAMES) and all(c.ok for c in checks), flag
    (directory / "new\nline").write_text("changed")
    result = run("verify", directory)
    assert result.exit_code == 1 and "MISMATCH new\nline: content changed" in result.output


@pytest.mark.parametrize(
    "line",
    ["\\" + "a" * 64 + "  bad\\escape", "a" * 64 + "\tname", "a" * 63 + "   name", "\\" + "a" * 64 + "  trailing\\"],
)
def test_a_malformed_sums_line_is_named(tmp_path, line):
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "SHA256SUMS").write_text(line + "\n")
    result = run("verify", directory)
    assert_one_line_refusal(result, 1, "SHA256SUMS:1:")


# --- the diff's own checksums cover its config and companion files ------------------------------------------------


@pytest.mark.parametrize(
    "name, action",
    [
        ("config.json", "edit"),
        ("tokenizer_config.json", "edit"),
        ("tokenizer.json", "edit"),
        ("generation_config.json", "edit"),
        ("tokenizer.json", "remove"),
        ("config.json", "edit-without-sha256sums"),
        ("tokenizer.json", "edit-both-sums-agree-not"),
    ],
)
def test_a_companion_edited_after_make_diff_is_refused_by_recover_and_verify(
    pair, made_diff, copy_dir, tmp_path, name, action
):
    import hashlib

    raw, _ = pair
    diff = copy_dir(made_diff)
    manifest = json.loads((diff / "weight-diff-manifest.json").read_text())
    assert name in manifest["files"]  # make-diff covers its companions in the manifest
    path = diff / name
    if action == "remove":
        path.unlink()
    else:
        body = json.loads(path.read_text())
        body["edited"] = "after make-diff"
        path.write_text(json.dumps(body))
    if action == "edit-without-sha256sums":
        (diff / "SHA256SUMS").unlink()
    if action == "edit-both-sums-agree-not":  # SHA256SUMS re-made to match the edit; the manifest still disagrees
        sums = (diff / "SHA256SUMS").read_text().splitlines()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        fixed = [f"{digest}  {name}" if line.endswith(f"  {name}") else line for line in sums]
        (diff / "SHA256SUMS").write_text("\n".join(fixed) + "\n")
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    message = {"remove": "listed in the diff's checksums but missing", "edit-both-sums-agree-not": "disagree"}
    assert_one_line_refusal(result, 1, message.get(action, "differs from the diff's checksums"))
    assert snapshot(diff) == before and not (tmp_path / "out").exists()
    checked = run("verify", diff)
    assert checked.exit_code == 1, checked.output
    assert "Traceback" not in checked.output and "unexpected" not in checked.output
    if action != "edit-both-sums-agree-not":
        assert f"MISMATCH {name}" in checked.output, checked.output


def test_verify_of_an_untouched_diff_checks_its_files_too(made_diff):
    result = run("verify", made_diff)
    assert result.exit_code == 0, result.output
    assert "diff files and tensors" in result.output


# --- doubtful cases, decided: NaN/Inf warned, float16 overflow refused, all-zero diffs, what is copied -------------


def _model_with(source: Path, target: Path, change) -> Path:
    """Copy a model directory and rewrite its weights after ``change(state)``."""
    from conftest import load_tensors
    from weight_diff.tiny_llama import save_checkpoint

    shutil.copytree(source, target)
    state = load_tensors(source)
    change(state)
    save_checkpoint(state, target, fmt="safetensors")
    return target


def test_nan_in_the_tuned_model_is_warned_by_make_diff_and_recover(pair, tmp_path):
    raw, tuned = pair

    def poison(state):
        state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")

    bad = _model_with(tuned, tmp_path / "tuned", poison)
    made = run("make-diff", "--path_raw", raw, "--path_tuned", bad, "--path_diff", tmp_path / "diff", "--quiet")
    assert made.exit_code == 0, made.output
    assert "warning: 2 tensors hold NaN or Inf values (first: model.layers.0.mlp.up_proj.weight)" in made.output
    result = recover_cli(raw, tmp_path / "diff", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "warning: 2 tensors hold NaN or Inf values" in result.output
    assert "verified: " in result.output and "NaN/Inf values included" in result.output


def test_a_finite_model_gets_no_warning(pair, made_diff, tmp_path):
    raw, _ = pair
    result = recover_cli(raw, made_diff, tmp_path / "out")
    assert result.exit_code == 0 and "warning" not in result.output and "note:" not in result.output


@pytest.mark.parametrize("dtype, value, refused", [("float16", 1e6, True), ("bfloat16", 1e6, False)])
def test_a_cast_that_overflows_to_inf_is_refused(pair, tmp_path, dtype, value, refused):
    raw, tuned = pair

    def grow(state):
        state["model.layers.1.mlp.down_proj.weight"][2, 2] = value

    big = _model_with(tuned, tmp_path / "tuned", grow)
    assert (
        run("make-diff", "--path_raw", raw, "--path_tuned", big, "--path_diff", tmp_path / "diff", "-q").exit_code == 0
    )
    out = tmp_path / "out"
    result = recover_cli(raw, tmp_path / "diff", out, "--dtype", dtype)
    # (the plausibility checks also warn about so large a diff value: only our refusal's line is pinned here)
    if not refused:
        assert result.exit_code == 0 and "NaN or Inf" not in result.output, result.output
        return
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: tensor model.layers.1.mlp.down_proj.weight: values up to 1e+06 exceed float16's")
    assert "would be written as Inf" in last
    assert not (out / "config.json").exists()
    again = recover_cli(raw, tmp_path / "diff", out, "--dtype", "bfloat16", "--overwrite")
    assert again.exit_code == 0, again.output


def test_make_diff_of_a_model_against_itself(pair, tmp_path):
    raw, _ = pair
    same = run("make-diff", "--path_raw", raw, "--path_tuned", raw, "--path_diff", tmp_path / "diff", "-q")
    assert_one_line_refusal(same, 2, "the same directory, so the diff would be all zeros")
    assert not (tmp_path / "diff").exists()
    twin = shutil.copytree(raw, tmp_path / "twin")
    copy = run("make-diff", "--path_raw", raw, "--path_tuned", twin, "--path_diff", tmp_path / "diff", "-q")
    assert copy.exit_code == 0, copy.output
    assert "warning: every value of the diff is 0" in copy.output


def test_only_what_a_model_directory_needs_is_copied_and_the_rest_is_named(pair, made_diff, copy_dir, tmp_path):
    raw, _ = pair
    diff = copy_dir(made_diff)
    (diff / "tf_model.h5").write_bytes(b"\x89HDF" + bytes(1000))
    (diff / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    (diff / "flax_model.msgpack").write_bytes(bytes(10))
    (diff / "LICENSE").write_text("licence text")
    (diff / "README.md").write_text("# card")
    # new files are not in the diff's checksums: the checked companions stay as they were
    result = recover_cli(raw, diff, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert (out / "LICENSE").read_text() == "licence text" and (out / "README.md").exists()
    assert not any((out / name).exists() for name in ("tf_model.h5", "model.gguf", "flax_model.msgpack"))
    assert "note: not copied (not part of a Hugging Face model directory): flax_model.msgpack, model.gguf, " in (
        result.output
    )


def _record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """Return the list that will hold, in order, ("fsync", path fsynced) and ("rename", directory renamed into)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("rename", str(Path(dst).parent)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_the_output_directory_is_fsynced_after_each_rename(pair, made_diff, tmp_path, monkeypatch):
    raw, _ = pair
    out = tmp_path / "out"
    events = _record_fsyncs_and_renames(monkeypatch)
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "200KB").exit_code == 0
    renames = [i for i, event in enumerate(events) if event == ("rename", str(out))]
    assert len(renames) >= 5
    for index in renames:  # every rename into the output is followed by an fsync of the output directory
        assert ("fsync", str(out)) in events[index + 1 :], events[index:]
    assert events[-1] == ("fsync", str(out))


def test_a_compact_diff_and_its_recovery_fsync_the_directory_before_the_next_rename(pair, tmp_path, monkeypatch):
    raw, tuned = pair
    events = _record_fsyncs_and_renames(monkeypatch)
    diff, out = tmp_path / "diff", tmp_path / "out"
    made = run("make-diff", "--path_raw", raw, "--path_tuned", tuned, "--path_diff", diff, "--format", "compact", "-q")
    assert made.exit_code == 0, made.output
    recovered = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", out, "-q")
    assert recovered.exit_code == 0, recovered.output
    for directory in (diff, out):
        renames = [i for i, event in enumerate(events) if event == ("rename", str(directory))]
        assert len(renames) >= 3
        for index in renames:  # each rename is made durable before anything else is renamed into place
            following = events[index + 1 :]
            next_rename = next((i for i, event in enumerate(following) if event[0] == "rename"), len(following))
            assert ("fsync", str(directory)) in following[:next_rename], events[index:]


def test_a_name_with_control_characters_stays_on_one_line_and_drives_no_terminal(tmp_path):
    name = "evil\nname\x1b[31m"
    (tmp_path / "model.safetensors").write_bytes(
        _safetensors(
            {name: {**_F, "shape": [0, 4], "data_offsets": [0, 0]}, "b": {**_F, "shape": [2], "data_offsets": [0, 8]}},
            D8,
        )
    )
    result = run("inspect", tmp_path, "--no-hash")
    assert_one_line_refusal(result, 1, "tensor evil\\nname\\x1b[31m has no values")
    assert "\x1b" not in result.output


def test_directories_made_for_a_refused_run_are_removed_again(pair, tmp_path):
    raw, tuned = pair
    out = tmp_path / "a" / "b" / "out"
    result = recover_cli(raw, tuned, out)  # a model given as the diff: refused after the output was claimed
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "name",
    ["tokenizer.json", "README.md", "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"],
)
def test_a_link_out_of_the_input_directory_is_refused_unread(pair, legacy_diff, made_diff, copy_dir, tmp_path, name):
    raw, _ = pair
    diff = copy_dir(made_diff)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / name).write_bytes((diff / name).read_bytes() if (diff / name).exists() else b"private key")
    (diff / name).unlink(missing_ok=True)
    (diff / name).symlink_to(secret / name)  # what a cloned repository could hold, pointing at the user's files
    (diff / "SHA256SUMS").unlink()  # so that the checksums do not catch it first
    before = snapshot(diff)
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_one_line_refusal(result, 1, "outside")
    assert snapshot(diff) == before and not (tmp_path / "out").exists()


def test_a_hugging_face_cache_snapshot_with_links_to_its_blobs_is_read(pair, made_diff, tmp_path):
    raw, _ = pair
    repo = tmp_path / "models--org--diff"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir = repo / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    for path in made_diff.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        shutil.copy(path, blob)
        (snapshot_dir / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    result = recover_cli(raw, snapshot_dir, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert run("verify", snapshot_dir).exit_code == 0


def test_resume_leaves_a_partial_file_of_the_users_alone(pair, made_diff, tmp_path, monkeypatch):
    from weight_diff import writer

    raw, _ = pair
    out = tmp_path / "out"
    real_finish = writer.ShardWriter.finish

    def finish_then_stop(self):
        real_finish(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.ShardWriter, "finish", finish_then_stop)
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "200KB").exit_code == 130
    monkeypatch.undo()
    (out / "thesis.tex.partial").write_text("the user's")
    assert recover_cli(raw, made_diff, out, "--max-shard-size", "200KB", "--resume").exit_code == 0
    assert (out / "thesis.tex.partial").read_text() == "the user's"


def test_an_input_that_another_run_is_writing_is_not_read(pair, made_diff, copy_dir, tmp_path, held):
    raw, tuned = pair
    diff = copy_dir(made_diff)
    held(diff)  # as a make-diff still writing it would
    result = recover_cli(raw, diff, tmp_path / "out")
    assert_one_line_refusal(result, 2, "a weight-diff run is still writing there")
    assert not (tmp_path / "out").exists()


# --- messages that say what is wrong ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "inspect", "compare", "recover-raw", "recover-diff"])
def test_a_file_given_for_a_directory_is_called_a_file(pair, made_diff, tmp_path, command):
    raw, _ = pair
    given = made_diff / "config.json"
    args = {
        "verify": ["verify", given],
        "inspect": ["inspect", given],
        "compare": ["compare", given, raw],
        "recover-raw": ["recover", "--path_raw", given, "--path_diff", made_diff, "--path_tuned", tmp_path / "o"],
        "recover-diff": ["recover", "--path_raw", raw, "--path_diff", given, "--path_tuned", tmp_path / "o"],
    }[command]
    result = run(*args)
    assert result.exit_code in (1, 2)
    assert_one_line_refusal(result, result.exit_code, "not a directory")
    assert "no such directory" not in result.output


def test_a_listed_folder_is_not_called_missing(pair, made_diff, tmp_path):
    raw, _ = pair
    out = tmp_path / "out"
    assert recover_cli(raw, made_diff, out).exit_code == 0
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").mkdir()
    result = run("verify", out)
    assert result.exit_code == 1 and "MISMATCH tokenizer.json: not a regular file" in result.output


@pytest.mark.parametrize("size", ["0", "0.1B", "0.0001KB", "-5GB", "nan", "inf", "1e3GB", ""])
def test_a_shard_size_below_a_byte_or_not_a_size_is_refused(pair, made_diff, tmp_path, size):
    raw, _ = pair
    result = recover_cli(raw, made_diff, tmp_path / "out", "--max-shard-size", size)
    assert_one_line_refusal(result, 2, "--max-shard-size")
    assert not (tmp_path / "out").exists()


def test_a_pre_2020_bin_too_large_to_hold_in_memory_is_refused(tmp_path, monkeypatch):
    import io

    from weight_diff import checkpoint

    buffer = io.BytesIO()
    torch.save({"model.norm.weight": torch.ones(64)}, buffer, _use_new_zipfile_serialization=False)
    (tmp_path / "pytorch_model.bin").write_bytes(buffer.getvalue())
    monkeypatch.setattr(checkpoint, "LEGACY_LIMIT", 100)  # stands for 4 GiB: the file is loaded whole
    assert_one_line_refusal(run("inspect", tmp_path, "--no-hash"), 1, "would be loaded whole into memory")


@pytest.mark.parametrize(
    "name, content",
    [
        ("tokenizer.json", NESTED.encode()),
        ("tokenizer.json", b'{"version": "\xff"}'),
        ("tokenizer.json", b'{"version": 1e999}'),
        ("tokenizer.model", bytes(range(256)) * 2),
        ("special_tokens_map.json", NESTED.encode()),
        ("tokenizer_config.json", b'{"\xff": 1}'),
        ("added_tokens.json", b"[1, 2]"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_damaged_tokenizer_file_without_checksums_is_one_clear_line(
    pair, made_diff, copy_dir, tmp_path, name, content
):
    raw, _ = pair
    diff = copy_dir(made_diff)
    (diff / "SHA256SUMS").unlink()
    _edit_json(diff / "weight-diff-manifest.json", _manifest_edit(lambda body: body.pop("files")))
    (diff / name).write_bytes(content)
    before = snapshot(diff)
    assert_one_line_refusal(recover_cli(raw, diff, tmp_path / "out"), 1, name)
    assert snapshot(diff) == before and not (tmp_path / "out").exists()
    inspected = run("inspect", diff, "--no-hash")
    assert "unexpected" not in inspected.output and "Traceback" not in inspected.output
