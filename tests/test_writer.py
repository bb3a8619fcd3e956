import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from weight_diff import writer as writer_module
from weight_diff.checkpoint import TensorInfo, aligned_bytes
from weight_diff.errors import DiskFullError
from weight_diff.manifest import tensor_bytes
from weight_diff.plan import ShardPlan, TensorJob
from weight_diff.writer import ShardWriter


def shard(tensors: dict[str, torch.Tensor], out_dtype=torch.float32) -> ShardPlan:
    """A one-shard plan writing ``tensors`` in ``out_dtype`` (None: each in its own dtype)."""
    jobs = []
    for name, tensor in tensors.items():
        info = TensorInfo(name, tensor.dtype, tuple(tensor.shape), Path("in.safetensors"), 0)
        jobs.append(TensorJob(name, info, info, out_dtype or tensor.dtype, 0))
    return ShardPlan("model.safetensors", tuple(jobs))


def test_a_streamed_shard_reads_back_with_the_safetensors_library_at_mode_0644(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 2, 2)}
    writer = ShardWriter(tmp_path, shard(tensors))
    assert (tmp_path / "model.safetensors.partial").exists() and not (tmp_path / "model.safetensors").exists()
    for tensor in tensors.values():
        writer.write(tensor_bytes(tensor[:1].contiguous()))  # in blocks of rows, as the pipeline writes
        writer.write(tensor_bytes(tensor[1:].contiguous()))
    writer.finish()
    path = tmp_path / "model.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and not (tmp_path / "model.safetensors.partial").exists()
    with safe_open(path, framework="pt") as file:
        assert list(file.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(file.get_tensor(name), tensor)
        assert file.metadata() == {"format": "pt"}
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0 and (8 + header_length) % 4096 == 0  # tensors start on a page


def test_a_short_shard_is_never_renamed_into_place(tmp_path):
    writer = ShardWriter(tmp_path, shard({"a": torch.randn(4)}))
    writer.write(b"\0" * 8)
    with pytest.raises(RuntimeError, match="planned"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_disk_full_removes_the_partial_shard_and_every_later_write_says_so(tmp_path, monkeypatch, direct):
    writer = ShardWriter(tmp_path, shard({"a": torch.randn(6 * 2**20)}), direct=direct)
    assert writer.direct == direct

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module.os, "write", full)
    block = b"\0" * (writer_module.STAGING_BYTES // 2)
    with pytest.raises(DiskFullError, match="disk full while writing model.safetensors"):
        for _ in range(4):  # O_DIRECT writes when its staging buffer fills
            writer.write(block)
    with pytest.raises(DiskFullError):
        writer.write(block)
    with pytest.raises(DiskFullError):
        writer.finish()
    assert list(tmp_path.iterdir()) == []


def test_direct_and_buffered_writes_give_the_same_file_of_any_length(tmp_path):
    # 5 MiB + 12 bytes of float32 and an odd-sized float16 tensor: the last O_DIRECT block is padded, then cut.
    tensors = {"w": torch.randn(1310723), "h": torch.randn(3, 7).half()}
    files = {}
    for direct in (True, False):
        directory = tmp_path / str(direct)
        directory.mkdir()
        writer = ShardWriter(directory, shard(tensors, out_dtype=None), direct=direct)
        for tensor in tensors.values():
            writer.write(tensor_bytes(tensor))
        writer.finish()
        files[direct] = (directory / "model.safetensors").read_bytes()
    assert files[True] == files[False]
    assert len(files[True]) == writer.expected


def test_page_aligned_blocks_go_to_disk_from_their_own_memory_and_give_the_same_file(tmp_path, monkeypatch):
    # Whole pages of a page-aligned block are written as they are (no copy through the staging buffer); an odd
    # tail, and a block that does not start on a page, go through staging. The file is the buffered one.
    first = aligned_bytes(3 * 4096 + 100)
    first.copy_(torch.randint(0, 256, first.shape, dtype=torch.uint8))
    second = aligned_bytes(2 * 4096)
    second.copy_(torch.randint(0, 256, second.shape, dtype=torch.uint8))
    blocks = [first, second[:4096], second[4096:], second]  # after the odd tail: staged, though on pages
    tensors = {"a": torch.empty(sum(len(block) for block in blocks), dtype=torch.uint8)}
    real_write, sent = os.write, []
    monkeypatch.setattr(
        writer_module.os, "write", lambda fd, data: sent.append(memoryview(data)) or real_write(fd, data)
    )
    files = {}
    for direct in (True, False):
        directory = tmp_path / str(direct)
        directory.mkdir()
        writer = ShardWriter(directory, shard(tensors, out_dtype=None), direct=direct)
        for block in blocks:
            writer.write(tensor_bytes(block))
        writer.finish()
        files[direct] = (directory / "model.safetensors").read_bytes()
        if direct:
            assert writer.direct
            own = [view for view in sent if writer_module._address(view) == first.data_ptr()]
            assert [len(view) for view in own] == [3 * 4096]
    assert files[True] == files[False]
    assert files[True][4096:] == b"".join(bytes(tensor_bytes(block)) for block in blocks)


@pytest.mark.parametrize("staging", [writer_module.STAGING_BYTES, 3 * 4096], ids=["pages_as_they_are", "staged"])
def test_o_direct_refused_at_a_write_keeps_every_later_byte_in_order(tmp_path, monkeypatch, staging):
    # A file system may accept O_DIRECT at open and refuse a write (EINVAL). Bytes left over from the write that
    # was refused, and every later write, must follow in order: they once went to the staging buffer and came
    # after the later writes (a wrong model, reported as verified).
    import fcntl

    monkeypatch.setattr(writer_module, "STAGING_BYTES", staging)
    real_write, refused = os.write, []

    def refuse_first_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", refuse_first_direct)
    pieces = [bytes(range(256)) * 16, aligned_bytes(2 * 4096 + 100), aligned_bytes(5000), bytes(range(7)) * 999]
    for value, piece in enumerate(pieces[1:3], start=1):
        piece.fill_(value)
    file = writer_module.StagedFile(tmp_path / "f")
    assert file.direct
    for piece in pieces:
        file.write(piece if isinstance(piece, bytes) else tensor_bytes(piece))
    file.finish()
    assert refused and not file.direct
    expected = b"".join(piece if isinstance(piece, bytes) else bytes(tensor_bytes(piece)) for piece in pieces)
    assert (tmp_path / "f").read_bytes() == expected


def test_a_short_direct_write_then_a_refusal_writes_each_byte_once(tmp_path, monkeypatch):
    # The fallback wrote the whole buffer again from where the disk's copy ended, after a short write had put
    # part of it there already: those bytes came twice.
    import fcntl

    real_write, calls = os.write, []

    def short_then_refuse(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, memoryview(data)[: 2 * 4096])
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", short_then_refuse)
    block = aligned_bytes(8 * 4096)
    block.copy_(torch.randint(0, 256, block.shape, dtype=torch.uint8))
    file = writer_module.StagedFile(tmp_path / "f")
    file.write(tensor_bytes(block))
    file.finish()
    assert len(calls) == 2 and not file.direct
    assert (tmp_path / "f").read_bytes() == bytes(tensor_bytes(block))


def test_a_file_system_without_o_direct_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(writer_module.os, "open", no_direct)
    writer = ShardWriter(tmp_path, shard({"a": torch.ones(4)}))
    assert not writer.direct
    writer.write(tensor_bytes(torch.ones(4)))
    writer.finish()
    assert (tmp_path / "model.safetensors").stat().st_size == writer.expected


def test_a_direct_write_refused_midway_continues_buffered_with_the_same_bytes(tmp_path, monkeypatch):
    tensors = {"w": torch.randn(6 * 2**20)}  # 24 MiB: the first staging flush happens mid-shard
    real_write = os.write
    calls = {"n": 0}

    def refuse_first(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer_module.os, "write", refuse_first)
    writer = ShardWriter(tmp_path, shard(tensors))
    assert writer.direct
    writer.write(tensor_bytes(tensors["w"]))
    writer.finish()
    assert not writer.direct
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        assert torch.equal(file.get_tensor("w"), tensors["w"])
