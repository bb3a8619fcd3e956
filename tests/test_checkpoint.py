import io
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from weight_diff.checkpoint import Checkpoint
from weight_diff.errors import CheckpointError
from weight_diff.tiny_llama import save_checkpoint


def weights():
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=generator).half(),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "lm_head.weight": torch.randn(10, 4, generator=generator).half(),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 2])
def test_every_layout_reads_back_the_saved_values(tmp_path, fmt, shards):
    saved = weights()
    save_checkpoint(saved, tmp_path, fmt=fmt, shards=shards)
    with Checkpoint.open(tmp_path) as checkpoint:
        assert checkpoint.layout == fmt + ("-sharded" if shards > 1 else "")
        assert set(checkpoint.tensors) == set(saved)
        for name, tensor in saved.items():
            info = checkpoint.tensors[name]
            assert (info.dtype, info.shape) == (tensor.dtype, tuple(tensor.shape))
            assert torch.equal(checkpoint.read_rows(info, 0, info.rows), tensor)
            assert torch.equal(checkpoint.read_rows(info, 3, 4), tensor[3:4])


def test_rotary_inv_freq_buffers_of_old_conversions_are_ignored(tmp_path):
    saved = weights() | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    save_checkpoint(saved, tmp_path, fmt="bin")
    with Checkpoint.open(tmp_path) as checkpoint:
        assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in checkpoint.tensors


def test_bin_tensors_are_read_by_offset_without_keeping_the_mmap(tmp_path):
    save_checkpoint(weights(), tmp_path, fmt="bin")
    with Checkpoint.open(tmp_path) as checkpoint:
        assert all(info.offset is not None for info in checkpoint.tensors.values())


def test_a_strided_tensor_and_a_legacy_pickle_still_read_correctly(tmp_path):
    strided = torch.randn(4, 6).t()  # saved as a view: not contiguous in the file
    torch.save({"model.norm.weight": torch.ones(3), "w": strided}, tmp_path / "pytorch_model.bin")
    with Checkpoint.open(tmp_path) as checkpoint:
        assert torch.equal(checkpoint.read_rows(checkpoint.tensors["w"], 1, 5), strided[1:5])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    buffer = io.BytesIO()
    torch.save({"w": strided.contiguous()}, buffer, _use_new_zipfile_serialization=False)
    (legacy / "pytorch_model.bin").write_bytes(buffer.getvalue())
    with Checkpoint.open(legacy) as checkpoint:
        assert torch.equal(checkpoint.read_rows(checkpoint.tensors["w"], 0, 6), strided)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused: its pickle holds code .* it was not executed"):
        Checkpoint.open(tmp_path)
    assert not marker.exists()


def test_missing_directory_and_empty_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no weights in a known layout"):
        Checkpoint.open(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"x")  # Meta's layout, read as such: its params.json is named
    with pytest.raises(CheckpointError, match="params.json: missing; Meta's size directory holds it"):
        Checkpoint.open(tmp_path)


def test_a_shard_named_in_the_index_but_missing_is_named(tmp_path):
    save_checkpoint(weights(), tmp_path, fmt="safetensors", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard named in .* is missing"):
        Checkpoint.open(tmp_path)


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path):
    save_checkpoint(weights(), tmp_path, fmt="safetensors", shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 tensors named in the index are in no shard"):
        Checkpoint.open(tmp_path)


def test_a_truncated_safetensors_shard_is_named(tmp_path):
    save_file(weights(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: file ends inside tensor .*truncated"):
        Checkpoint.open(tmp_path)


def test_garbage_in_a_safetensors_file_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        Checkpoint.open(tmp_path)


def test_a_corrupted_bin_zip_is_named(tmp_path):
    save_checkpoint(weights(), tmp_path, fmt="bin")
    path = tmp_path / "pytorch_model.bin"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "no_o_direct"])
def test_rows_read_the_same_with_or_without_o_direct(tmp_path, monkeypatch, direct):
    import errno

    from weight_diff import checkpoint as checkpoint_module

    if not direct:
        real_open = os.open

        def refuse_direct(path, flags, *args):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(checkpoint_module.os, "open", refuse_direct)
    saved = {"a": torch.randn(3), "b": torch.randn(1001, 7), "c": torch.randn(5, 3).half()}  # unaligned offsets
    save_file(saved, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as checkpoint:
        for name, tensor in saved.items():
            info = checkpoint.tensors[name]
            assert torch.equal(checkpoint.read_rows(info, 0, info.rows), tensor)
            assert torch.equal(checkpoint.read_rows(info, 1, 2), tensor[1:2])
            assert torch.equal(checkpoint.read_rows(info, 0, info.rows, out=off_page_buffer(info.nbytes)), tensor)
        uses_direct = checkpoint._fds.get((tmp_path / "model.safetensors", True)) is not None
        assert uses_direct == (direct and hasattr(os, "O_DIRECT"))


def off_page_buffer(nbytes):
    """A caller's own buffer, aligned for any dtype but not to a page: reads take the buffered path."""
    base = torch.empty(nbytes + 8192, dtype=torch.uint8)
    skip = (8 - base.data_ptr()) % 4096 or 8
    return base[skip : skip + nbytes]


def test_a_direct_read_refused_after_open_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    import errno

    from weight_diff import checkpoint as checkpoint_module

    saved = {"b": torch.randn(1001, 7)}
    save_file(saved, tmp_path / "model.safetensors")
    real_preadv = os.preadv
    calls = {"n": 0}

    def refuse_first(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(checkpoint_module.os, "preadv", refuse_first)
    with Checkpoint.open(tmp_path) as checkpoint:
        info = checkpoint.tensors["b"]
        assert torch.equal(checkpoint.read_rows(info, 0, info.rows), saved["b"])
        assert checkpoint._fds[(tmp_path / "model.safetensors", True)] is None
