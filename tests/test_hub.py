"""Hub repositories as inputs, against a hub look-alike on 127.0.0.1 (tests/hub_server.py) and the real
huggingface_hub client: the same tensors as from local files, every file checked against the hub's checksums,
resume after a dropped connection and after kill -9, bounded disk with --no-keep-download, one-line refusals,
offline from the cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, load_tensors
from hub_server import Fault, HubServer
from weight_diff.cli import main
from weight_diff.output import JOURNAL_NAME
from weight_diff.sources import hub as hub_source
from weight_diff.sources import hub_diff
from weight_diff.sources.repo_spec import RepoSpec, hub_spec_for, parse_repo_spec

RAW, LEGACY, MANIFESTED, FOUR = "meta/llama-tiny", "ai2/diff-tiny", "wd/diff-manifest", "ai2/diff-four"
SHARD1 = "pytorch_model-00001-of-00002.bin"


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def four_shard_diff(pair, original, tmp_path_factory):
    """A 2023-style diff (float32 .bin, no manifest) in four shards, for the disk bound."""
    raw, tuned = pair
    return original.make_diff(
        raw, tuned, tmp_path_factory.mktemp("four") / "diff", added_rows="mean", fmt="bin", shards=4
    )


@pytest.fixture
def hub(tmp_path, monkeypatch, pair, legacy_diff, made_diff, four_shard_diff):
    server = HubServer(lifetime=120)
    server.publish(RAW, pair[0])
    server.publish(LEGACY, legacy_diff, tags=("v1.0",))
    server.publish(MANIFESTED, made_diff)
    server.publish(FOUR, four_shard_diff)
    for name, value in server.env(tmp_path / "hf").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with server:
        yield server


@pytest.fixture
def local_result(pair, legacy_diff, tmp_path):
    out = tmp_path / "local"
    assert run("recover", "--path_raw", pair[0], "--path_diff", legacy_diff, "--path_tuned", out, "-q").exit_code == 0
    return load_tensors(out)


def blobs(tmp_path: Path, repo_id: str) -> dict[str, int]:
    folder = tmp_path / "hf" / "hub" / ("models--" + repo_id.replace("/", "--")) / "blobs"
    sizes = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # a running download renames its partial file meanwhile
            sizes[path.name] = path.stat().st_size
    return sizes


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), name


def test_repo_ids_are_told_from_local_paths(tmp_path):
    assert parse_repo_spec("allenai/self-instruct-13b") == RepoSpec("allenai/self-instruct-13b", "main")
    assert parse_repo_spec("hf://org/name@v1.0") == RepoSpec("org/name", "v1.0")
    assert parse_repo_spec("hf:/org/name") == RepoSpec("org/name", "main")  # click's Path folds the //
    assert parse_repo_spec("/abs/path") is None and parse_repo_spec("a/b/c") is None
    assert parse_repo_spec("../name") is None and parse_repo_spec("name") is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert hub_spec_for("org/name") is None  # a local directory wins
        assert hub_spec_for("org/other") == RepoSpec("org/other")
        assert hub_spec_for("hf://org/name") == RepoSpec("org/name")
    finally:
        os.chdir(REPO)


def test_recover_from_repo_ids_gives_the_tensors_of_local_files(hub, local_result, tmp_path):
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", f"hf://{LEGACY}@v1.0", "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert_same(load_tensors(out), local_result)
    assert "downloaded files match the hub's checksums" in result.output
    assert "publisher's manifest" not in result.output.replace("could not be checked against the publisher", "")
    # The diff's shards were fetched in shard order, each once, whole (besides ranged reads of their ends).
    gets = [p for m, p, r in hub.requests if m == "GET" and p.endswith(".bin") and r is None]
    assert [Path(p).name for p in gets] == [SHARD1, "pytorch_model-00002-of-00002.bin"]
    # Both repositories stay in huggingface_hub's cache, under its names.
    assert any(len(name) == 64 for name in blobs(tmp_path, RAW)) and blobs(tmp_path, LEGACY)


def test_a_diff_with_a_manifest_is_planned_from_ranged_headers_and_verified(hub, pair, made_diff, tmp_path):
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", MANIFESTED, "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert "downloaded files match the hub's checksums" in result.output
    assert "tensors match the publisher's manifest" in result.output
    assert "bytes=0-7" in hub.range_requests("model-00001-of-00002.safetensors")
    checked = run("verify", out, "--diff", MANIFESTED)  # the manifest alone is fetched, no weights
    assert checked.exit_code == 0 and "verified:" in checked.output, checked.output
    local = tmp_path / "local"
    assert run("recover", "--path_raw", pair[0], "--path_diff", made_diff, "--path_tuned", local, "-q").exit_code == 0
    assert_same(load_tensors(out), load_tensors(local))


def test_a_corrupted_download_is_named_and_deleted_and_a_second_run_succeeds(hub, local_result, tmp_path):
    hub.faults[(LEGACY, SHARD1)] = Fault(corrupt=True)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", out, "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert SHARD1 in lines[0] and "does not match the hub's SHA-256" in lines[0] and "run the same command" in lines[0]
    true_sha = hub.repos[LEGACY].files[SHARD1].sha256
    assert true_sha not in blobs(tmp_path, LEGACY)  # the bad copy is gone, not served from the cache next time
    assert not any(name.endswith(hub_source.PARTIAL_SUFFIX) for name in blobs(tmp_path, LEGACY))
    assert not (out / "config.json").exists()
    assert not out.exists()  # refused before its first shard: the output is left as it was (not there)
    del hub.faults[(LEGACY, SHARD1)]
    again = run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", out, "-q")  # the same command
    assert again.exit_code == 0, again.output
    assert_same(load_tensors(out), local_result)


def test_a_dropped_connection_continues_with_a_range_request(hub, local_result, tmp_path):
    hub.faults[(LEGACY, SHARD1)] = Fault(drop_after=100_000, drops=2)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert_same(load_tensors(out), local_result)
    ranges = hub.range_requests(SHARD1)
    assert len(ranges) == 2 and all(int(r.split("=")[1].rstrip("-")) >= 100_000 for r in ranges), ranges


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_mid_download_then_resume_continues_the_partial_file(hub, local_result, tmp_path, stop):
    hub.rate = 150_000  # a slow link: about 2 s per diff shard
    out = tmp_path / "out"
    command = [sys.executable, "-m", "weight_diff.cli", "recover", "--path_raw", RAW, "--path_diff", LEGACY]
    command += ["--path_tuned", str(out), "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        partials = {n: s for n, s in blobs(tmp_path, LEGACY).items() if n.endswith(hub_source.PARTIAL_SUFFIX)}
        if partials and max(partials.values()) > 50_000:
            child.send_signal(stop)
            break
        time.sleep(0.02)
    child.wait(timeout=30)
    said = child.stdout.read().decode()
    if stop == signal.SIGKILL:  # no handler ran: the journal stays, and --resume picks the run up
        assert child.returncode == -signal.SIGKILL, said
        again = ["--resume"]
    else:  # stopped before its first shard: nothing of the run is left but the download's partial file
        assert child.returncode == 130, said
        assert "interrupted before anything was written; run the same command again" in said, said
        assert not out.exists()
        again = []
    assert not (out / "config.json").exists()
    partials = {n: s for n, s in blobs(tmp_path, LEGACY).items() if n.endswith(hub_source.PARTIAL_SUFFIX)}
    assert len(partials) == 1, partials
    (blob, partial_size), *_ = partials.items()
    interrupted = next(f.path for f in hub.repos[LEGACY].files.values() if blob.startswith(str(f.sha256)))
    hub.rate = None
    result = run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", out, *again, "-q")
    assert result.exit_code == 0, result.output
    assert_same(load_tensors(out), local_result)
    assert partial_size > 0 and f"bytes={partial_size}-" in hub.range_requests(interrupted)


def test_no_keep_download_deletes_each_diff_shard_once_written_and_bounds_disk(
    hub, pair, four_shard_diff, tmp_path, monkeypatch
):
    monkeypatch.setattr(hub_diff, "EDGE", 4096)  # each shard is laid out from its ends and read as it arrives
    shards = {f.sha256: f.size for f in hub.repos[FOUR].files.values() if f.path.endswith(".bin")}
    shard_sizes = sorted(shards.values())
    peaks = []
    fetch = hub_source.fetch

    def measured_fetch(snapshot, file, *args, **kwargs):
        path = fetch(snapshot, file, *args, **kwargs)
        if snapshot.spec.repo_id == FOUR and file.path.endswith(".bin"):
            peaks.append(sum(size for name, size in blobs(tmp_path, FOUR).items() if name in shards))
        return path

    monkeypatch.setattr(hub_source, "fetch", measured_fetch)
    out = tmp_path / "out"
    result = run(
        "recover", "--path_raw", RAW, "--path_diff", FOUR, "--path_tuned", out, "--no-keep-download",
        "--max-shard-size", "150KB", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(peaks) == 4 and max(peaks) <= shard_sizes[-1] + shard_sizes[-2]
    assert not set(shards) & set(blobs(tmp_path, FOUR))  # every diff shard deleted
    assert any(len(name) == 64 for name in blobs(tmp_path, RAW))  # raw stays in the cache
    local = tmp_path / "local"
    assert (
        run("recover", "--path_raw", pair[0], "--path_diff", four_shard_diff, "--path_tuned", local, "-q").exit_code
        == 0
    )
    assert_same(load_tensors(out), load_tensors(local))


def test_a_corrupted_last_diff_shard_fails_with_no_output_shard_from_it_finalised(
    hub, pair, four_shard_diff, tmp_path, monkeypatch
):
    monkeypatch.setattr(hub_diff, "EDGE", 4096)  # each shard is laid out from its ends and read as it arrives
    last = sorted(n for n in hub.repos[FOUR].files if n.endswith(".bin"))[-1]
    weight_map = json.loads((four_shard_diff / "pytorch_model.bin.index.json").read_text())["weight_map"]
    from_last = {name for name, file in weight_map.items() if file == last}
    hub.faults[(FOUR, last)] = Fault(corrupt=True)
    hub.rate = 400_000  # a slow link: the shards are read while they arrive
    out = tmp_path / "out"
    result = run(
        "recover", "--path_raw", RAW, "--path_diff", FOUR, "--path_tuned", out, "--no-keep-download",
        "--max-shard-size", "150KB", "-q",
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert last in result.output and "does not match the hub's SHA-256" in result.output, result.output
    assert "bytes=0-4095" in hub.range_requests(last)  # its layout was learned before it arrived
    finished = sorted(out.glob("*.safetensors"))
    assert finished  # output shards fed only by the earlier diff shards were finished (kept for --resume) ...
    for shard in finished:  # ... and none holding a tensor of the corrupted one
        with safe_open(shard, "pt") as handle:
            assert not set(handle.keys()) & from_last, shard.name
    journaled = json.loads((out / JOURNAL_NAME).read_text())["shards"]
    assert journaled and set(journaled) <= {shard.name for shard in finished}
    assert not (out / "config.json").exists()
    del hub.faults[(FOUR, last)]
    hub.rate = None
    again = run(
        "recover", "--path_raw", RAW, "--path_diff", FOUR, "--path_tuned", out, "--no-keep-download",
        "--max-shard-size", "150KB", "--resume", "-q",
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    local = tmp_path / "local"
    assert (
        run("recover", "--path_raw", pair[0], "--path_diff", four_shard_diff, "--path_tuned", local, "-q").exit_code
        == 0
    )
    assert_same(load_tensors(out), load_tensors(local))


@pytest.mark.parametrize(
    ("raw", "diff", "fault", "expected"),
    [
        (RAW, "nobody/nothing", None, "no repository nobody/nothing on http://127.0.0.1"),
        (RAW, f"{LEGACY}@v9", None, "the hub has no revision 'v9' of ai2/diff-tiny"),
        (RAW, LEGACY, "missing", f"the hub has no file {SHARD1}"),
        (RAW, "gated/model", None, "a gated repository; accept its conditions"),
    ],
)
def test_a_missing_repo_revision_or_file_is_one_clear_line(hub, pair, tmp_path, raw, diff, fault, expected):
    hub.publish("gated/model", pair[0], gated=True)
    if fault:
        hub.faults[(LEGACY, SHARD1)] = Fault(missing=True)
    result = run("recover", "--path_raw", raw, "--path_diff", diff, "--path_tuned", tmp_path / "out", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


def test_offline_works_from_the_cache_and_names_what_is_missing(hub, local_result, tmp_path, monkeypatch):
    assert run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", tmp_path / "a", "-q").exit_code == 0
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", tmp_path / "b", "-q")
    assert result.exit_code == 0, result.output
    assert_same(load_tensors(tmp_path / "b"), local_result)
    missing = run("recover", "--path_raw", RAW, "--path_diff", MANIFESTED, "--path_tuned", tmp_path / "c", "-q")
    assert missing.exit_code == 1
    assert "wd/diff-manifest: no such local directory, and that repository is not in the cache" in missing.output
    assert "HF_HUB_OFFLINE" in missing.output and len(missing.output.strip().splitlines()) == 1


def test_inspect_compare_and_make_diff_take_repo_ids(hub, pair, tmp_path):
    inspected = run("inspect", LEGACY, "--no-hash")
    assert inspected.exit_code == 0 and "diff" in inspected.output.lower()
    assert run("compare", RAW, pair[0], "-q").exit_code == 0
    hub.publish("me/tuned", pair[1])
    made = run("make-diff", "--path_raw", RAW, "--path_tuned", "me/tuned", "--path_diff", tmp_path / "d", "-q")
    assert made.exit_code == 0, made.output
    local = tmp_path / "local"
    assert run("make-diff", "--path_raw", pair[0], "--path_tuned", pair[1], "--path_diff", local, "-q").exit_code == 0
    assert_same(load_tensors(tmp_path / "d"), load_tensors(local))


def test_a_mistyped_local_path_without_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = run("recover", "--path_raw", "models/llama", "--path_diff", "x/y", "--path_tuned", tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith("error: models/llama: no such local directory, and cannot reach")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_one_progress_bar_counts_download_and_write_with_both_rates(hub, tmp_path):
    hub.rate = 300_000  # slow enough that the bar refreshes its rates during the run
    result = CliRunner().invoke(
        main, ["recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    bars = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("recover")]
    assert bars and all("B" in line for line in bars)
    assert any("download" in line and "MB/s" in line for line in bars)
    assert any("download" in line and "write" in line for line in bars), bars[-3:]


def test_a_belle_payload_on_the_hub_is_told_by_its_listing_before_its_files_are_fetched(tmp_path, monkeypatch):
    """BELLE's .enc files are large non-weight files, fetched only when needed: the family is told from the
    repository's listing, without --family belle."""
    from test_xor import belle_publisher

    meta, payload, plain = belle_publisher(tmp_path, monkeypatch)
    monkeypatch.setattr(hub_source, "SMALL_FILE", 50)  # every .enc file counts as large, as real shards do
    server = HubServer(lifetime=60)
    server.publish("belle/payload", payload)
    for name, value in server.env(tmp_path / "hf").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with server:
        shown = run("inspect", "belle/payload", "--json")
        result = run("recover", "--path_raw", meta, "--path_diff", "belle/payload", "--path_tuned", tmp_path / "o")
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.output)
    assert found["family"].startswith("belle") and found["shards"] == 2
    assert found["total_bytes"] == sum(p.stat().st_size for p in payload.iterdir())
    assert result.exit_code == 0, result.output
    assert "family: belle" in result.output and "2 files match" in result.output
    for name, data in plain.items():
        assert (tmp_path / "o" / name).read_bytes() == data


COMPACT = "wd/diff-compact"


@pytest.fixture(scope="module")
def compact_diff(pair, tmp_path_factory):
    """A compact diff of the default pair, in five .wdc files."""
    from weight_diff.jobs import make_diff

    raw, tuned = pair
    diff = tmp_path_factory.mktemp("compact") / "diff"
    make_diff(raw, tuned, diff, diff_format="compact", max_shard_size="150KB")
    assert len(list(diff.glob("*.wdc"))) == 5
    return diff


def assert_bit_identical(out: Path, tuned: Path) -> None:
    expected, got = load_tensors(tuned), load_tensors(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no_keep_download"])
def test_a_compact_diff_on_the_hub_is_recovered_bit_for_bit_while_it_downloads(
    hub, pair, compact_diff, tmp_path, monkeypatch, keep
):
    hub.publish(COMPACT, compact_diff)
    wdc = {f.sha256: f.path for f in hub.repos[COMPACT].files.values() if f.path.endswith(".wdc")}
    last = max(wdc.values())
    out = tmp_path / "out"
    seen = []  # at each .wdc download: the .wdc files on disk, and the output shards finished so far
    fetch = hub_source.fetch

    def watched_fetch(snapshot, file, *args, **kwargs):
        if file.path.endswith(".wdc"):
            journal = out / JOURNAL_NAME
            done = json.loads(journal.read_text())["shards"] if journal.is_file() else {}
            seen.append((file.path, len(set(wdc) & set(blobs(tmp_path, COMPACT))), len(done)))
        return fetch(snapshot, file, *args, **kwargs)

    monkeypatch.setattr(hub_source, "fetch", watched_fetch)
    hub.rate = 200_000  # a slow link: about 2 s for the five files
    flags = [] if keep else ["--no-keep-download"]
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out, *flags,
                 "--max-shard-size", "100KB")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verified: 21 tensors match the publisher's manifest" in result.output
    assert_bit_identical(out, pair[1])
    assert [name for name, _, _ in seen] == sorted(wdc.values()), seen  # each downloaded once, in order
    assert seen[-1][2] >= 1, seen  # output shards were finished before the last file downloaded
    assert all(len(hub.range_requests(name)) >= 2 for name in wdc.values())  # planned from ranged index reads
    left = set(wdc) & set(blobs(tmp_path, COMPACT))
    if keep:
        assert left == set(wdc)
    else:
        assert left == set() and max(on_disk for _, on_disk, _ in seen) <= 1, seen  # one read, one downloading
    recovery = json.loads((out / "weight-diff-recovery.json").read_text())
    assert recovery["diff"] == f"hf://{COMPACT}@{hub.repos[COMPACT].commit}"
    assert last in {name for name, _, _ in seen}


def test_a_corrupted_compact_file_from_the_hub_is_named_and_resume_finishes(hub, pair, compact_diff, tmp_path):
    hub.publish(COMPACT, compact_diff)
    last = max(n for n in hub.repos[COMPACT].files if n.endswith(".wdc"))
    hub.faults[(COMPACT, last)] = Fault(corrupt=True)
    out = tmp_path / "out"
    args = ["recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out, "--max-shard-size", "100KB"]
    result = run(*args, "--no-keep-download", "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert last in result.output and "does not match the hub's SHA-256" in result.output, result.output
    journaled = json.loads((out / JOURNAL_NAME).read_text())["shards"]
    assert journaled and not (out / "config.json").exists()  # shards from the earlier files were kept
    del hub.faults[(COMPACT, last)]
    again = run(*args, "--no-keep-download", "--resume", "-q")
    assert again.exit_code == 0, again.output
    assert_bit_identical(out, pair[1])


def test_a_compact_file_on_the_hub_that_its_checksums_do_not_promise_is_refused_before_downloading(
    hub, compact_diff, copy_dir, tmp_path
):
    published = copy_dir(compact_diff)
    last = max(published.glob("*.wdc"))
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the repository holds another file under that name
    last.write_bytes(bytes(data))
    hub.publish(COMPACT, published)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out, "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{last.name} on the hub differs from the diff's SHA256SUMS" in result.output, result.output
    assert "Nothing was written" in result.output and not out.exists()
    wdc = {f.sha256 for f in hub.repos[COMPACT].files.values() if f.path.endswith(".wdc")}
    assert not wdc & set(blobs(tmp_path, COMPACT))  # no .wdc file was downloaded


def test_inspect_takes_a_compact_diff_on_the_hub(hub, compact_diff):
    hub.publish(COMPACT, compact_diff)
    result = run("inspect", COMPACT)
    assert result.exit_code == 0, result.output
    assert "weight-diff compact, 5 shards" in result.output and "all 13 files match SHA256SUMS" in result.output


def test_ctrl_c_while_a_compact_file_downloads_stops_at_once_and_resume_finishes(hub, pair, compact_diff, tmp_path):
    hub.publish(COMPACT, compact_diff)
    hub.rate = 40_000  # a slow link: about 9 s for the five files
    out = tmp_path / "out"
    args = ["recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", str(out), "--max-shard-size", "100KB"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen([sys.executable, "-m", "weight_diff.cli", *args, "-q"], env=env, stderr=subprocess.PIPE)
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.is_file() and '.safetensors"' in journal.read_text()):
        time.sleep(0.02)
    assert child.poll() is None, "the run finished before it could be interrupted"
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)  # the reader waits for the next file, which is still arriving
    _, stderr = child.communicate(timeout=30)
    assert time.monotonic() - sent < 5 and child.returncode == 130, stderr
    assert stderr.decode().strip() == (
        "error: interrupted; finished shards were kept. Run the same command with --resume to continue"
    )
    hub.rate = None
    again = run(*args, "--resume", "-q")
    assert again.exit_code == 0, again.output
    assert_bit_identical(out, pair[1])


def test_a_download_that_keeps_failing_says_how_to_continue_and_the_same_command_does(hub, local_result, tmp_path):
    hub.faults[(LEGACY, SHARD1)] = Fault(drop_after=1000, drops=10_000)
    out = tmp_path / "out"
    args = ["recover", "--path_raw", RAW, "--path_diff", LEGACY, "--path_tuned", out, "-q"]
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"downloading {SHARD1} failed 51 times" in result.output, result.output
    assert "51000 of" in result.output and "the same command continues the download" in result.output
    assert not out.exists()  # refused before its first shard: nothing to --resume
    del hub.faults[(LEGACY, SHARD1)]
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert_same(load_tensors(out), local_result)
    assert "bytes=51000-" in hub.range_requests(SHARD1)


def test_raw_in_metas_original_layout_on_the_hub_recovers_as_from_its_folder(hub, pair, made_diff, tmp_path):
    from weight_diff.tiny_llama import save_meta_dir, tiny_config

    size_dir = save_meta_dir(tmp_path / "meta" / "7B", load_tensors(pair[0]), config=tiny_config(), shards=2)
    (size_dir / "tokenizer.model").write_bytes(b"not read by weight-diff")  # where Meta's hub repositories have it
    hub.publish("meta/llama-original", size_dir)
    out, local = tmp_path / "out", tmp_path / "local"
    result = run("recover", "--path_raw", "meta/llama-original", "--path_diff", made_diff, "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert "verified: 21 tensors match the publisher's manifest" in result.output
    assert run("recover", "--path_raw", size_dir, "--path_diff", made_diff, "--path_tuned", local, "-q").exit_code == 0
    assert_same(load_tensors(out), load_tensors(local))


def test_resume_refuses_a_compact_diff_whose_repository_moved_to_a_new_commit(hub, pair, compact_diff, tmp_path):
    from conftest import interrupt_after
    from weight_diff.jobs import make_diff, recover

    hub.publish(COMPACT, compact_diff)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        recover(RAW, COMPACT, out, max_shard_size="100KB", progress=interrupt_after(150_000))
    assert (out / JOURNAL_NAME).is_file()
    retuned = tmp_path / "retuned"  # the publisher pushes a new version of the diff to main
    shutil.copytree(pair[1], retuned)
    weights = load_tensors(retuned)
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, retuned / "model.safetensors", metadata={"format": "pt"})
    make_diff(pair[0], retuned, tmp_path / "second", diff_format="compact", max_shard_size="150KB")
    hub.publish(COMPACT, tmp_path / "second")
    hub_source._resolved.clear()  # a later run asks the hub again
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out, "--max-shard-size",
                 "100KB", "--resume")  # fmt: skip
    assert result.exit_code == 2 and "used other inputs" in result.output, result.output
    assert not (out / "config.json").exists()


def lose_once_when_fetched(monkeypatch, name: str) -> list[str]:
    """Delete the file ``name`` from the cache right after its first download, as another run's
    --no-keep-download would; return the list the deleted name is put in."""
    fetch = hub_source.fetch
    deleted: list[str] = []

    def fetch_then_lose(snapshot, file, *args, **kwargs):
        path = fetch(snapshot, file, *args, **kwargs)
        if file.path == name and not deleted:
            hub_source.forget(snapshot, file)
            deleted.append(file.path)
        return path

    monkeypatch.setattr(hub_source, "fetch", fetch_then_lose)
    return deleted


def test_a_compact_file_another_run_deletes_before_it_is_opened_is_downloaded_again(
    hub, pair, compact_diff, tmp_path, monkeypatch
):
    hub.publish(COMPACT, compact_diff)
    second = sorted(n for n in hub.repos[COMPACT].files if n.endswith(".wdc"))[1]
    deleted = lose_once_when_fetched(monkeypatch, second)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert deleted == [second] and len([r for r in hub.requests if r[1].endswith(second) and r[0] == "GET"]) >= 2
    assert_bit_identical(out, pair[1])


def test_offline_from_a_cache_without_the_compact_files_asks_nothing_of_the_hub(
    hub, compact_diff, tmp_path, monkeypatch
):
    hub.publish(COMPACT, compact_diff)
    args = ["recover", "--path_raw", RAW, "--path_diff", COMPACT, "-q"]
    assert run(*args, "--path_tuned", tmp_path / "first", "--no-keep-download").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(hub.requests)
    result = run(*args, "--path_tuned", tmp_path / "second")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is not in the cache" in result.output and "HF_HUB_OFFLINE is set; run once online first" in result.output
    assert len(hub.requests) == asked and not (tmp_path / "second").exists()


def test_a_compact_diff_on_the_hub_without_a_manifest_recovers_on_the_first_run(
    hub, pair, compact_diff, copy_dir, tmp_path
):
    published = copy_dir(compact_diff)
    (published / "weight-diff-manifest.json").unlink()
    sums = (published / "SHA256SUMS").read_text().splitlines()
    (published / "SHA256SUMS").write_text("".join(f"{line}\n" for line in sums if "manifest" not in line))
    hub.publish(COMPACT, published)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out)
    assert result.exit_code == 0, result.output
    assert "not verified" in result.output
    assert_bit_identical(out, pair[1])


@pytest.mark.parametrize("repo", [MANIFESTED, LEGACY])
def test_a_diff_shard_another_run_deletes_as_it_arrives_is_downloaded_again(
    hub, pair, legacy_diff, made_diff, tmp_path, monkeypatch, repo
):
    shard = sorted(n for n in hub.repos[repo].files if n.endswith((".safetensors", ".bin")))[0]
    deleted = lose_once_when_fetched(monkeypatch, shard)
    monkeypatch.setattr(hub_diff, "EDGE", 4096)  # a .bin too is laid out from its ends and read as it arrives
    hub.rate = 400_000  # a slow link: the shard is read while it arrives, then arrives again
    out, local = tmp_path / "out", tmp_path / "local"
    result = run("recover", "--path_raw", RAW, "--path_diff", repo, "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert deleted == [shard]
    published = {MANIFESTED: made_diff, LEGACY: legacy_diff}[repo]
    assert run("recover", "--path_raw", pair[0], "--path_diff", published, "--path_tuned", local, "-q").exit_code == 0
    assert_same(load_tensors(out), load_tensors(local))


def test_a_small_compact_file_that_its_checksums_do_not_promise_is_refused_once_downloaded(
    hub, compact_diff, copy_dir, tmp_path, monkeypatch
):
    import hub_server

    monkeypatch.setattr(hub_server, "LFS_SUFFIXES", (".safetensors", ".bin"))  # small .wdc files: git ids only
    published = copy_dir(compact_diff)
    last = max(published.glob("*.wdc"))
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    hub.publish(COMPACT, published)
    assert hub.repos[COMPACT].files[last.name].sha256 is None
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", tmp_path / "out", "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{last.name} on the hub differs from the diff's SHA256SUMS" in result.output, result.output
    assert hub.repos[COMPACT].files[last.name].git_sha1 not in blobs(tmp_path, COMPACT)  # the bad copy is gone


def test_a_compact_file_in_the_repository_that_the_manifest_does_not_name_is_left_there(
    hub, pair, compact_diff, copy_dir, tmp_path
):
    # A leftover of an earlier upload (here: a copy of one of the diff's files, so its tensors are in two files)
    # cannot be removed by the user: it is neither read nor downloaded, and the run says so.
    published = copy_dir(compact_diff)
    first = min(published.glob("*.wdc"))
    (published / "old-upload.wdc").write_bytes(first.read_bytes())
    hub.publish(COMPACT, published)
    out = tmp_path / "out"
    result = run("recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", out)
    assert result.exit_code == 0, result.output
    assert "verified: 21 tensors match the publisher's manifest" in result.output
    assert "not downloaded (in the repository, but no part of the diff" in result.output
    assert "old-upload.wdc" in result.output
    assert_bit_identical(out, pair[1])
    described = run("inspect", COMPACT, "--no-hash")  # what the diff holds, from its indexes: five files, not six
    assert described.exit_code == 0 and "weight-diff compact, 5 shards" in described.output, described.output
    assert not [path for method, path, _ in hub.requests if method == "GET" and path.endswith("old-upload.wdc")]


def test_inspect_no_hash_of_a_compact_diff_on_the_hub_reads_only_its_indexes(hub, compact_diff, tmp_path):
    hub.publish(COMPACT, compact_diff)
    result = run("inspect", COMPACT, "--no-hash")
    assert result.exit_code == 0, result.output
    local = run("inspect", compact_diff, "--no-hash")
    described = [[x for x in lines[lines.index(next(x for x in lines if x.startswith("  kind:"))) :] if x.strip()]
                 for lines in (result.output.splitlines(), local.output.splitlines())]  # fmt: skip
    assert described[0] == described[1] and "5 shards" in result.output  # the same answer as from the files
    wdc = {f.sha256 for f in hub.repos[COMPACT].files.values() if f.path.endswith(".wdc")}
    assert not wdc & set(blobs(tmp_path, COMPACT))  # no .wdc file was downloaded
    assert all(hub.range_requests(name) for name in (f.name for f in compact_diff.glob("*.wdc")))


def test_a_stray_compact_file_beside_safetensors_weights_does_not_make_a_compact_diff(
    hub, pair, made_diff, copy_dir, tmp_path
):
    # A model or float32 diff repository holding some .wdc file (say, an upload by mistake) is what its
    # safetensors weights are: recover and inspect --no-hash read those.
    published = copy_dir(made_diff)
    (published / "stray.wdc").write_bytes(b"WDCOMPCT" + bytes(100))
    hub.publish("wd/diff-stray", published)
    out, local = tmp_path / "out", tmp_path / "local"
    result = run("recover", "--path_raw", RAW, "--path_diff", "wd/diff-stray", "--path_tuned", out, "-q")
    assert result.exit_code == 0, result.output
    assert run("recover", "--path_raw", pair[0], "--path_diff", made_diff, "--path_tuned", local, "-q").exit_code == 0
    assert_same(load_tensors(out), load_tensors(local))
    described = run("inspect", "wd/diff-stray", "--no-hash")
    assert described.exit_code == 0, described.output
    assert "weight-diff compact" not in described.output and "safetensors-sharded" in described.output


def test_a_compact_index_damaged_on_the_hub_asks_its_publisher(hub, compact_diff, copy_dir, tmp_path):
    # The repository's own file is damaged (its SHA256SUMS matches it): downloading again cannot help.
    published = copy_dir(compact_diff)
    last = max(published.glob("*.wdc"))
    data = bytearray(last.read_bytes())
    data[-20] ^= 0xFF  # inside the index, at the end
    last.write_bytes(bytes(data))
    sums = (published / "SHA256SUMS").read_text()
    old = hashlib.sha256(compact_diff.joinpath(last.name).read_bytes()).hexdigest()
    (published / "SHA256SUMS").write_text(sums.replace(old, hashlib.sha256(bytes(data)).hexdigest()))
    hub.publish(COMPACT, published)
    for args in (["recover", "--path_raw", RAW, "--path_diff", COMPACT, "--path_tuned", tmp_path / "out"],
                 ["inspect", COMPACT, "--no-hash"]):  # fmt: skip
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert COMPACT in result.output and last.name in result.output, result.output
        assert "ask its publisher" in result.output, result.output
        assert "download it again" not in result.output
