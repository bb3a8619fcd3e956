#!/usr/bin/env python
"""Measure how often the statistical plausibility checks (src/weight_diff/checks.py) fire on genuine inputs.

Each trial is one random tensor fed to a fresh ``Evidence`` whole (per tensor, the hardest case: a run pools
every tensor of a model). Genuine inputs must pass; their counterparts must be caught:

- precision: genuine float16 weights (normal, uniform or heavy-tailed, std 1e-3 to 1, 8K to 68K values) against
  the same rounded through bfloat16;
- grid: a float32 fine-tune's diff (no grid to land on) must never refuse; a float16 fine-tune's diff must land on
  the float16 grid on its own base and be refused on another base;
- magnitudes: fine-tune diffs of relative size 1e-6 to 0.3 against diffs made against another model.

Usage: python scripts/false_alarms.py --trials 20000 (run it under the bench lock: it keeps a core busy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# Python put scripts/ first on sys.path, where scripts/weight_diff.py would shadow the weight_diff package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from weight_diff.checks import REFUSE, WARN, Evidence, grid_finding, magnitude_finding, precision_finding  # noqa: E402


def _weights(index: int, generator: torch.Generator) -> torch.Tensor:
    count = 4096 * (2 + index % 16)
    scale = 10 ** (-3 + 3 * (index % 97) / 96)
    draw = torch.randn(count, generator=generator)
    if index % 3 == 1:
        draw = torch.rand(count, generator=generator) * 2 - 1
    elif index % 3 == 2:
        draw = draw * torch.randn(count, generator=generator)
    return (draw * scale).view(-1, 64)


def _evidence(raw: torch.Tensor, other: torch.Tensor) -> Evidence:
    evidence = Evidence()
    evidence.observe("w", raw, other, limit=raw.numel())
    return evidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(2026)
    counts = dict.fromkeys(
        ["precision_false", "precision_missed", "grid_false", "grid_right_refused", "grid_wrong_passed"], 0
    )
    counts |= {"grid_half_trials": 0, "magnitude_false": 0, "magnitude_missed": 0}
    worst = {"precision_share": 0.0, "grid_coarse_share": 0.0, "magnitude_ratio_genuine": 0.0}
    started = time.monotonic()
    for index in range(args.trials):
        weights = _weights(index, generator)
        genuine = weights.to(torch.float16)
        zeros = torch.zeros(weights.shape)
        evidence = _evidence(genuine, zeros)
        counts["precision_false"] += precision_finding(evidence, {}, other_role="diff").severity == REFUSE
        worst["precision_share"] = max(worst["precision_share"], evidence.float16_low_zero / evidence.float16_normal)
        rounded = genuine.to(torch.bfloat16).to(torch.float16)
        counts["precision_missed"] += precision_finding(_evidence(rounded, zeros), {}, other_role="diff").severity != (
            REFUSE
        )

        relative = 10 ** (-6 + 5.5 * (index % 89) / 88)  # 1e-6 to 0.3 of the weights' scale
        step = torch.randn(weights.shape, generator=generator) * weights.std() * relative
        fp32_diff = (genuine.float() + step) - genuine.float()  # a float32 fine-tune's diff
        evidence = _evidence(genuine, fp32_diff)
        counts["grid_false"] += grid_finding(evidence, other_role="diff").severity == REFUSE
        if evidence.diff_nonzero:
            worst["grid_coarse_share"] = max(worst["grid_coarse_share"], evidence.diff_coarse / evidence.diff_nonzero)
        counts["magnitude_false"] += magnitude_finding(evidence, other_role="diff").severity == WARN
        worst["magnitude_ratio_genuine"] = max(worst["magnitude_ratio_genuine"], max(evidence.ratios().values()))

        tuned16 = (genuine.float() + step).to(torch.float16)
        half_diff = tuned16.float() - genuine.float()  # a float16 fine-tune's diff
        if half_diff.count_nonzero() >= 4096:  # a step below float16's resolution leaves no diff to judge
            counts["grid_half_trials"] += 1
            right = grid_finding(_evidence(genuine, half_diff), other_role="diff").severity
            counts["grid_right_refused"] += right == REFUSE
            other_base = _weights(index + 97 * 16, generator).to(torch.float16)
            wrong = grid_finding(_evidence(other_base, half_diff), other_role="diff").severity
            counts["grid_wrong_passed"] += wrong != REFUSE

        other_model = _weights(index + 97 * 16, generator)  # same size, another draw
        other_model = other_model * (weights.std() / other_model.std())
        evidence = _evidence(genuine, weights - other_model)  # a diff made against another model of the same scale
        counts["magnitude_missed"] += magnitude_finding(evidence, other_role="diff").severity != WARN
    print(f"{args.trials} trials in {time.monotonic() - started:.0f} s")
    for name, count in counts.items():
        print(f"{name}: {count}")
    for name, value in worst.items():
        print(f"worst {name}: {value:.4f}")


if __name__ == "__main__":
    main()
