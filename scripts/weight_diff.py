"""The model card's command, kept working: ``python scripts/weight_diff.py recover --path_raw ... --path_tuned ...
--path_diff ...`` (and ``make_diff``). It delegates to the weight-diff package, which streams and checks."""

import sys
from pathlib import Path

try:
    from weight_diff.cli import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from weight_diff.cli import main

if __name__ == "__main__":
    main(prog_name="weight_diff.py")
