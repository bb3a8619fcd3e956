"""XOR families (OpenAssistant): a payload made the way xor_codec.py makes it, written here with plain numpy."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy
import pytest
from click.testing import CliRunner

from conftest import interrupt_after, snapshot
from weight_diff.cli import main
from weight_diff.errors import IntegrityError, UsageError
from weight_diff.inspect_dir import _describe_recovery
from weight_diff.jobs import recover
from weight_diff.manifest import RECOVERY_NAME, SUMS_NAME, read_sums
from weight_diff.output import JOURNAL_NAME
from weight_diff.xor import detect_files


def _xor(payload: bytes, base: bytes) -> bytes:
    """xor_codec.py's rule: the base zero-padded or cut to the payload's length."""
    base = base[: len(payload)].ljust(len(payload), b"\0")
    return (numpy.frombuffer(payload, numpy.uint8) ^ numpy.frombuffer(base, numpy.uint8)).tobytes()


@pytest.fixture
def publisher(tmp_path):
    """raw files (the publisher's conversion), the tuned files, and the XOR payload with its md5 list."""
    rng = numpy.random.default_rng(0)
    raw, tuned, payload = tmp_path / "llama_hf", tmp_path / "tuned", tmp_path / "payload"
    for d in (raw, tuned, payload):
        d.mkdir()
    files = {
        "config.json": (json.dumps({"vocab_size": 32000}).encode(), json.dumps({"vocab_size": 32016}).encode()),
        "pytorch_model-00001-of-00002.bin": (rng.bytes(300_000), rng.bytes(300_000)),
        "pytorch_model-00002-of-00002.bin": (rng.bytes(200_000), rng.bytes(200_123)),  # added tokens: longer
        "tokenizer_config.json": (b'{"a": 1, "long": "xxxxxxxxxxxxxxxx"}', b'{"a": 2}'),  # shorter than raw
    }
    lines = []
    for name, (raw_bytes, tuned_bytes) in files.items():
        (raw / name).write_bytes(raw_bytes)
        (tuned / name).write_bytes(tuned_bytes)
        (payload / name).write_bytes(_xor(tuned_bytes, raw_bytes))
        lines += [
            f"{hashlib.md5(raw_bytes).hexdigest()}  ./{name}",
            f"{hashlib.md5(tuned_bytes).hexdigest()}  ./{name}",
        ]
    (tuned / "added_tokens.json").write_text('{"<|prompter|>": 32000}')
    (payload / "added_tokens.json").write_text('{"<|prompter|>": 32000}')
    (payload / "README.md").write_text("# model card\n```\n" + "\n".join(lines) + "\n```\n")
    return raw, tuned, payload


def test_xor_gives_the_publishers_files_byte_for_byte_and_checks_the_md5_list(publisher, tmp_path):
    raw, tuned, payload = publisher
    report = recover(raw, payload, tmp_path / "out")
    assert report.family == "openassistant-xor" and "not JSON" in report.family_reason
    for path in tuned.iterdir():
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name
    assert "4 files match the publisher's MD5/SHA-256 list" in report.checks[0]
    assert "added_tokens.json" in report.checks[1]  # in clear, in no list: said so


def test_xor_with_a_differently_converted_raw_file_is_refused_and_nothing_loads(publisher, tmp_path):
    raw, tuned, payload = publisher
    shard = raw / "pytorch_model-00001-of-00002.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="not byte-identical to the one the publisher converted"):
        recover(raw, payload, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / shard.name).exists()


def test_xor_with_a_damaged_payload_blames_the_payload(publisher, tmp_path):
    raw, tuned, payload = publisher
    shard = payload / "pytorch_model-00001-of-00002.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="the payload file is damaged"):
        recover(raw, payload, tmp_path / "out")


def test_xor_needs_every_raw_file(publisher, tmp_path):
    raw, tuned, payload = publisher
    (raw / "tokenizer_config.json").unlink()
    with pytest.raises(UsageError, match="lacks 1 file.*tokenizer_config.json.*exactly as the publisher converted"):
        recover(raw, payload, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_xor_without_a_list_says_what_could_not_be_checked(publisher, tmp_path):
    raw, tuned, payload = publisher
    (payload / "README.md").unlink()
    args = ["recover", "--path_raw", str(raw), "--path_diff", str(payload), "--path_tuned", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "-q"])
    assert result.exit_code == 0, result.output
    assert "family: openassistant-xor" in result.output and "recovered 5 files" in result.output
    assert "5 files are in no checksum list" in result.output and "not verified" in result.output


def _cli_recover(raw, payload, out, *extra):
    args = ["recover", "--path_raw", str(raw), "--path_diff", str(payload), "--path_tuned", str(out), "-q", *extra]
    return CliRunner().invoke(main, args)


def _assert_the_publishers_files(out, tuned):
    for path in tuned.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    record = out / RECOVERY_NAME
    expected = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in [*tuned.iterdir(), record]}
    assert read_sums(out / SUMS_NAME) == expected
    assert {p.name for p in out.iterdir()} == {*expected, SUMS_NAME}  # no journal, no partial file left


def _interrupted(raw, payload, out):
    """An XOR recovery stopped (as by Ctrl-C) while writing its third file, the second shard."""
    with pytest.raises(KeyboardInterrupt):
        recover(raw, payload, out, progress=interrupt_after(350_000))
    assert not list(out.glob("*.partial")) and not (out / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [JOURNAL_NAME, "added_tokens.json",
                                                     "pytorch_model-00001-of-00002.bin"]  # fmt: skip


def test_an_interrupted_xor_recovery_resumes_and_keeps_its_finished_files(publisher, tmp_path):
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    _interrupted(raw, payload, out)
    first = out / "pytorch_model-00001-of-00002.bin"
    written_at = first.stat().st_mtime_ns
    result = _cli_recover(raw, payload, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "recovered 5 files (0.50 MB, 2 kept from the interrupted run)" in result.output
    assert "4 files match the publisher's MD5/SHA-256 list" in result.output
    assert first.stat().st_mtime_ns == written_at  # kept, not written again
    _assert_the_publishers_files(out, tuned)


def test_a_finished_file_damaged_before_resume_is_written_again(publisher, tmp_path):
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    _interrupted(raw, payload, out)
    first = out / "pytorch_model-00001-of-00002.bin"
    data = bytearray(first.read_bytes())
    data[7] ^= 1
    first.write_bytes(bytes(data))
    result = _cli_recover(raw, payload, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "1 kept from the interrupted run" in result.output
    _assert_the_publishers_files(out, tuned)


def test_a_finished_xor_recovery_is_ours_to_overwrite_and_says_how_it_was_made(publisher, tmp_path):
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    assert _cli_recover(raw, payload, out).exit_code == 0
    record = json.loads((out / RECOVERY_NAME).read_text())
    assert record["family"] == "openassistant-xor" and record["files"] == 5 and len(record["files_checked"]) == 4
    assert not record["verified"]  # added_tokens.json is in no list
    # What inspect says of it (this payload's .bin files are random bytes, so inspect itself cannot read them).
    assert "4 of 5 files match the publisher's checksum list" in _describe_recovery(record)
    result = _cli_recover(raw, payload, out, "--overwrite")
    assert result.exit_code == 0, result.output
    _assert_the_publishers_files(out, tuned)


def test_an_interrupted_xor_recovery_can_be_started_again_with_overwrite(publisher, tmp_path):
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    _interrupted(raw, payload, out)
    refused = _cli_recover(raw, payload, out)
    assert refused.exit_code == 2 and "add --resume to finish it" in refused.output
    result = _cli_recover(raw, payload, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "kept from the interrupted run" not in result.output
    _assert_the_publishers_files(out, tuned)


def test_resume_after_the_payload_changed_is_refused_untouched(publisher, tmp_path):
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    _interrupted(raw, payload, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (payload / "tokenizer_config.json").write_bytes(b"another payload")
    result = _cli_recover(raw, payload, out, "--resume")
    assert result.exit_code == 2 and "the interrupted run there used other inputs or options" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_options_that_would_change_an_xor_result_are_refused(publisher, tmp_path):
    raw, tuned, payload = publisher
    result = _cli_recover(raw, payload, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "--dtype and --chat-template do not apply" in result.output
    assert not (tmp_path / "out").exists()


def test_inspect_names_an_xor_payload(publisher):
    raw, tuned, payload = publisher
    result = CliRunner().invoke(main, ["inspect", str(payload), "--no-hash"])
    assert result.exit_code == 0, result.output
    assert "openassistant-xor" in result.output and "XOR payload" in result.output


def _belle_encrypt(plain: bytes, key: bytes, chunk: int) -> bytes:
    """BELLE's rule (decrypt.py, run backwards): SHA-256 header, then chunk-wise XOR with the cycling key file."""
    out, offset = [hashlib.sha256(plain).digest()], 0
    for start in range(0, len(plain), chunk):
        data = plain[start : start + chunk]
        if offset >= len(key):
            offset = 0
        key_chunk = key[offset : offset + chunk]
        offset += chunk
        stream = (key_chunk * (len(data) // len(key_chunk) + 1))[: len(data)]
        out.append(bytes(a ^ b for a, b in zip(data, stream, strict=True)))
    return b"".join(out)


def belle_publisher(tmp_path, monkeypatch):
    """Meta's folder (its consolidated.00.pth the key), a BELLE payload made from it, and the plain files; the rule
    at small scale: 1000-byte chunks, so 3 data chunks and a key of 1.3 chunks."""
    from weight_diff import xor

    monkeypatch.setattr(xor, "BELLE_CHUNK", 1000)
    rng = numpy.random.default_rng(2)
    meta, payload = tmp_path / "7B", tmp_path / "belle-enc"
    meta.mkdir(), payload.mkdir()
    key = rng.bytes(1300)
    (meta / "consolidated.00.pth").write_bytes(key)
    plain = {"pytorch_model-00001-of-00001.bin": rng.bytes(2500), "config.json": b'{"vocab_size": 32000}'}
    for name, data in plain.items():
        sha = hashlib.sha256(data).hexdigest()
        (payload / f"{name}.{sha}.enc").write_bytes(_belle_encrypt(data, key, 1000))
    return meta, payload, plain


def test_belle_decodes_with_metas_consolidated_and_checks_the_sha256_header(tmp_path, monkeypatch):
    meta, payload, plain = belle_publisher(tmp_path, monkeypatch)
    key = (meta / "consolidated.00.pth").read_bytes()
    report = recover(meta, payload, tmp_path / "out")
    assert report.family == "belle" and ".enc" in report.family_reason
    for name, data in plain.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert "2 files match" in report.checks[0]
    (meta / "consolidated.00.pth").write_bytes(key[:-1] + bytes([key[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="not Meta's original LLaMA-7B consolidated.00.pth"):
        recover(meta, payload, tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


def test_overwrite_refused_by_a_wrong_raw_file_keeps_the_earlier_recovery_and_the_fixed_command_runs(
    publisher, tmp_path
):
    """Found by a review: the first clear-text file written counted as a finished shard, so the earlier model was
    deleted, and the refused run's journal blocked the corrected command."""
    raw, tuned, payload = publisher
    out = tmp_path / "out"
    assert _cli_recover(raw, payload, out).exit_code == 0
    before = snapshot(out)
    bad = tmp_path / "bad-raw"
    shutil.copytree(raw, bad)
    shard = bad / "pytorch_model-00002-of-00002.bin"  # the second weight file: others are written before it fails
    shard.write_bytes(bytes([shard.read_bytes()[0] ^ 1]) + shard.read_bytes()[1:])
    refused = _cli_recover(bad, payload, out, "--overwrite")
    assert refused.exit_code == 1 and "not byte-identical to the one the publisher converted" in refused.output
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    fresh = tmp_path / "fresh"
    assert _cli_recover(bad, payload, fresh).exit_code == 1 and not fresh.exists()
    assert _cli_recover(raw, payload, fresh).exit_code == 0  # the corrected command, as it was
    _assert_the_publishers_files(fresh, tuned)


@pytest.mark.parametrize("config", [b"", b"\0" * 700, b"<html>502 Bad Gateway</html>"], ids=["empty", "zeros", "html"])
def test_a_diff_whose_config_json_is_damaged_is_not_taken_for_an_xor_payload(
    pair, legacy_diff, copy_dir, tmp_path, config
):
    # A failed download of config.json beside weight files that open as they are: recovering it as an XOR payload
    # wrote a broken model and said so with exit status 0.
    damaged = copy_dir(legacy_diff)
    (damaged / "config.json").write_bytes(config)
    out = tmp_path / "out"
    result = _cli_recover(pair[0], damaged, out)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "xor" not in result.output.lower() and "config.json" in result.output, result.output
    assert not out.exists() or not any(out.iterdir())


def test_a_family_forced_on_the_other_kind_of_diff_is_refused_by_name(publisher, pair, legacy_diff, tmp_path):
    # Forcing a tensor family on an XOR payload blamed the download ("two records overlap; damaged file"), and an
    # XOR family on a diff of tensors said the raw model lacked files.
    raw, _, payload = publisher
    tensors = _cli_recover(raw, payload, tmp_path / "a", "--family", "open-instruct")
    assert tensors.exit_code == 2 and "an XOR payload" in tensors.output and "omit --family" in tensors.output
    xor_on_tensors = _cli_recover(pair[0], legacy_diff, tmp_path / "b", "--family", "openassistant-xor")
    assert xor_on_tensors.exit_code == 2 and "not an XOR payload" in xor_on_tensors.output, xor_on_tensors.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_payload_whose_configs_share_a_long_start_and_that_ships_a_file_in_clear_is_still_one(tmp_path):
    # Two LLaMA configs alike in their first hundred bytes XOR to zeros there; a training_args.bin in clear is a
    # torch zip that opens as it is. Neither makes the payload a damaged diff.
    import torch

    raw, tuned, payload = tmp_path / "raw", tmp_path / "tuned", tmp_path / "payload"
    for d in (raw, tuned, payload):
        d.mkdir()
    common = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    rng = numpy.random.default_rng(1)
    files = {
        "config.json": (json.dumps({**common, "vocab_size": 32000}).encode(),
                        json.dumps({**common, "vocab_size": 32016}).encode()),
        "pytorch_model.bin": (rng.bytes(50_000), rng.bytes(50_000)),
    }  # fmt: skip
    assert files["config.json"][0][:100] == files["config.json"][1][:100]
    for name, (raw_bytes, tuned_bytes) in files.items():
        (raw / name).write_bytes(raw_bytes)
        (tuned / name).write_bytes(tuned_bytes)
        (payload / name).write_bytes(_xor(tuned_bytes, raw_bytes))
    result = _cli_recover(raw, payload, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "family: openassistant-xor" in result.output
    assert (tmp_path / "out" / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"][1]
    assert (tmp_path / "out" / "config.json").read_bytes() == files["config.json"][1]
    torch.save({"learning_rate": 1e-5}, payload / "training_args.bin")  # not a model's weights: no evidence
    assert detect_files(payload) is not None and detect_files(payload)[0] == "same-name"


def test_a_config_json_with_a_byte_order_mark_is_json(tmp_path):
    # On the hub only the small files are here when the kind of diff is told: no weight file to look at.
    (tmp_path / "config.json").write_bytes(b'\xef\xbb\xbf{"vocab_size": 32000}')
    assert detect_files(tmp_path) is None


def test_a_payload_whose_config_did_not_change_is_still_one(tmp_path):
    # tuned's config.json equal to raw's XORs to zeros: beside weight files that do not open, still a payload.
    raw, tuned, payload = tmp_path / "raw", tmp_path / "tuned", tmp_path / "payload"
    for d in (raw, tuned, payload):
        d.mkdir()
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 32000}).encode()
    rng = numpy.random.default_rng(2)
    files = {"config.json": (config, config), "pytorch_model.bin": (rng.bytes(40_000), rng.bytes(40_000))}
    for name, (raw_bytes, tuned_bytes) in files.items():
        (raw / name).write_bytes(raw_bytes)
        (tuned / name).write_bytes(tuned_bytes)
        (payload / name).write_bytes(_xor(tuned_bytes, raw_bytes))
    assert not (payload / "config.json").read_bytes().strip(b"\0")
    result = _cli_recover(raw, payload, tmp_path / "out")
    assert result.exit_code == 0 and "family: openassistant-xor" in result.output, result.output
    assert (tmp_path / "out" / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"][1]


def test_a_compact_diff_whose_config_json_is_damaged_is_not_taken_for_an_xor_payload(pair, tmp_path):
    raw, tuned = pair
    diff = tmp_path / "diff"
    recover_result = CliRunner().invoke(
        main, ["make-diff", "--path_raw", str(raw), "--path_tuned", str(tuned), "--path_diff", str(diff),
               "--format", "compact", "-q"]
    )  # fmt: skip
    assert recover_result.exit_code == 0, recover_result.output
    (diff / "config.json").write_bytes(b"<html>502 Bad Gateway</html>")
    result = _cli_recover(raw, diff, tmp_path / "out")
    assert result.exit_code != 0 and "xor" not in result.output.lower(), result.output
    assert "config.json" in result.output and "Traceback" not in result.output
