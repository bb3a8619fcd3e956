from pathlib import Path

import pytest
import torch

from weight_diff.checkpoint import TensorInfo
from weight_diff.errors import PlanError, UsageError
from weight_diff.plan import describe_size, plan_pairs
from weight_diff.role import role_of
from weight_diff.sizes import parse_size


def info(name, shape, dtype=torch.float32):
    return TensorInfo(name, dtype, tuple(shape), Path("x.safetensors"), 0)


def llama(hidden, vocab, dtype=torch.float16, layers=1):
    names = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (hidden, hidden)
    return {n: info(n, s, dtype) for n, s in names.items()}


def plan(raw, other, **options):
    return plan_pairs(
        raw,
        other,
        other_role="diff",
        out_dtype=options.pop("out_dtype", "auto"),
        max_shard_size=options.pop("max_shard_size", "5GB"),
    )


def test_added_vocab_row_is_planned_for_embeddings_and_lm_head_only():
    result = plan(llama(64, 320), llama(64, 321, torch.float32))
    added = {job.name: job.added_rows for job in result.jobs}
    assert added == {
        "model.embed_tokens.weight": 1,
        "lm_head.weight": 1,
        "model.norm.weight": 0,
        "model.layers.0.self_attn.q_proj.weight": 0,
    }
    assert all(job.out_dtype == torch.float32 for job in result.jobs)  # auto keeps the diff's dtype


def test_a_7b_raw_for_a_13b_diff_is_refused_with_both_sizes_named():
    with pytest.raises(PlanError) as error:
        plan(llama(4096, 32000), llama(5120, 32001, torch.float32))
    assert "LLaMA-7B (hidden 4096, vocab 32000)" in str(error.value)
    assert "LLaMA-13B (hidden 5120, vocab 32001)" in str(error.value)


def test_missing_and_extra_tensors_are_counted_and_named():
    with pytest.raises(PlanError, match=r"1 diff tensors have no raw counterpart \(first: model.layers.1"):
        plan(llama(64, 320, layers=1), llama(64, 320, layers=2))
    with pytest.raises(PlanError, match=r"1 raw tensors are not in the diff .*different numbers of layers"):
        plan(llama(64, 320, layers=2), llama(64, 320, layers=1))


def test_a_diff_with_fewer_vocab_rows_than_raw_is_refused():
    with pytest.raises(PlanError, match="raw has shape \\[321, 64\\], diff has \\[320, 64\\]"):
        plan(llama(64, 321), llama(64, 320))


def test_non_float_tensors_are_refused():
    raw = llama(64, 320)
    diff = dict(llama(64, 320))
    diff["model.norm.weight"] = info("model.norm.weight", (64,), torch.int64)
    with pytest.raises(PlanError, match="diff tensor model.norm.weight is torch.int64, not floating point"):
        plan(raw, diff)


def test_output_dtype_can_be_chosen_and_bad_names_are_usage_errors():
    result = plan(llama(64, 320), llama(64, 320, torch.float32), out_dtype="bfloat16")
    assert {job.out_dtype for job in result.jobs} == {torch.bfloat16}
    assert result.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype int8"):
        plan(llama(64, 320), llama(64, 320), out_dtype="int8")


def test_shards_respect_the_maximum_and_follow_hugging_face_names():
    raw, diff = llama(64, 320, layers=4), llama(64, 321, torch.float32, layers=4)
    result = plan(raw, diff, max_shard_size=100_000)
    assert [shard.file_name for shard in result.shards] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(shard.nbytes <= 100_000 for shard in result.shards)
    assert result.total_size == sum(job.out_nbytes for job in result.jobs)
    assert set(result.weight_map) == set(diff)
    single = plan(raw, diff)
    assert [shard.file_name for shard in single.shards] == ["model.safetensors"]


def test_a_tensor_larger_than_the_maximum_gets_a_shard_of_its_own():
    result = plan(llama(64, 320), llama(64, 320, torch.float32), max_shard_size=10)
    assert len(result.shards) == len(result.jobs)


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1024", 1024), ("1.5 kb", 1500)],
)
def test_sizes_parse_like_hugging_face(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1GB", "0"])
def test_bad_sizes_are_usage_errors(text):
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size(text)


def test_norm_weights_tell_a_model_from_a_diff():
    assert role_of(1.0) == "model"
    assert role_of(0.001) == "diff"
    assert role_of(0.1) is None
    assert role_of(None) is None


def test_unknown_sizes_are_described_plainly():
    assert describe_size({}) == "an unknown model"
    assert describe_size(llama(64, 320)) == "a model (hidden 64, vocab 320)"
