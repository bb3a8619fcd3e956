"""The model card's command, kept working: ``python scripts/weight_diff.py recover --path_raw ... --path_tuned ...
--path_diff ...`` (and ``make_diff``). It delegates to the weight-diff package, which streams and checks.

The 2023 script's other flags (``--device``, ``--test_inference``, ``--check_integrity_naively``, as ``fire``
took them) are accepted with a note and left out: recovery streams on the CPU, every tensor is checked against
the diff's manifest or the family's own sum, and ``weight-diff generate OUT`` tries the model."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
try:
    from weight_diff.cli import main
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(HERE.parent / "src"))
    from weight_diff.cli import main

FLAGS_2023 = ("--device", "--test_inference", "--check_integrity_naively")
VALUES_2023 = {"true", "false", "yes", "no", "cpu", "cuda", "mps"}  # what fire read after them (and numbers)


def without_2023_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Return the arguments without the 2023 script's flags (``--flag``, ``--flag=V`` or ``--flag V``), and those."""
    kept, dropped = [], []
    rest = iter(args)
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name not in FLAGS_2023 and name.removeprefix("--no") not in {f.removeprefix("--") for f in FLAGS_2023}:
            kept.append(arg)
            continue
        dropped.append(arg)
        if "=" not in arg:
            following = next(rest, None)
            if following is None:
                break
            if following.lower() in VALUES_2023 or following.lower().startswith("cuda:") or following.isdigit():
                dropped[-1] += f" {following}"
            else:
                kept.append(following)
    return kept, dropped


if __name__ == "__main__":
    args, dropped = without_2023_flags(sys.argv[1:])
    if dropped:
        print(
            f"note: {', '.join(dropped)}: the 2023 script's, left out (weight-diff streams on the CPU and checks every "
            "tensor; `weight-diff generate OUT` tries the model)",
            file=sys.stderr,
        )
    main(args, prog_name="weight_diff.py")
