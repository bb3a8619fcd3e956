import torch

from weight_diff.arithmetic import RowMean, diff_rows, recover_rows


def test_row_mean_over_blocks_matches_the_2023_mean_within_float32_rounding():
    rows = torch.randn(1000, 48).to(torch.float16)
    mean = RowMean((48,))
    for start in range(0, 1000, 137):
        mean.add(rows[start : start + 137])
    expected = rows.float().mean(dim=0, keepdim=True)  # what smart_tokenizer_and_embedding_resize computes
    torch.testing.assert_close(mean.value(), expected, rtol=0, atol=1e-6)


def test_row_mean_does_not_depend_on_the_blocking():
    rows = torch.randn(999, 16).to(torch.float16)
    means = []
    for step in (1, 10, 999):
        mean = RowMean((16,))
        for start in range(0, 999, step):
            mean.add(rows[start : start + step])
        means.append(mean.value())
    assert torch.equal(means[0], means[1]) and torch.equal(means[1], means[2])


def test_recover_adds_in_float32_exactly_like_the_2023_script():
    raw = torch.randn(8, 4).to(torch.float16)
    diff = torch.randn(8, 4) * 1e-3
    out = torch.empty(8, 4)
    recover_rows(raw, diff, out)
    assert torch.equal(out, diff.clone().add_(raw.float()))


def test_make_diff_gives_the_result_recover_will_compute():
    raw = torch.randn(8, 4).to(torch.float16)
    tuned = raw.float() + torch.randn(8, 4) * 1e-3
    diff, result = torch.empty(8, 4), torch.empty(8, 4)
    diff_rows(raw, tuned, diff, result)
    assert torch.equal(diff, tuned - raw.float())
    assert torch.equal(result, recover_rows(raw, diff, torch.empty(8, 4)))
    torch.testing.assert_close(result, tuned, rtol=0, atol=1e-6)
