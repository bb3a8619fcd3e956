import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from weight_diff import writer as writer_module
from weight_diff.checkpoint import TensorInfo
from weight_diff.errors import DiskFullError
from weight_diff.manifest import tensor_bytes
from weight_diff.plan import ShardPlan, TensorJob
from weight_diff.writer import ShardWriter


def shard(tensors: dict[str, torch.Tensor], out_dtype=torch.float32) -> ShardPlan:
    jobs = []
    for name, tensor in tensors.items():
        info = TensorInfo(name, tensor.dtype, tuple(tensor.shape), Path("in.safetensors"), 0)
        jobs.append(TensorJob(name, info, info, out_dtype, 0))
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
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0


def test_a_short_shard_is_never_renamed_into_place(tmp_path):
    writer = ShardWriter(tmp_path, shard({"a": torch.randn(4)}))
    writer.write(b"\0" * 8)
    with pytest.raises(RuntimeError, match="planned"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []


def test_disk_full_removes_the_partial_shard_and_every_later_write_says_so(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, shard({"a": torch.randn(1024)}))

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module.os, "write", full)
    with pytest.raises(DiskFullError, match="disk full while writing model.safetensors"):
        writer.write(b"\0" * 4096)
    with pytest.raises(DiskFullError):
        writer.write(b"\0" * 4096)
    assert list(tmp_path.iterdir()) == []
