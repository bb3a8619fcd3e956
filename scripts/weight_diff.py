"""The model card's command, kept working: ``python scripts/weight_diff.py recover --path_raw ... --path_tuned ...
--path_diff ...`` (and ``make_diff``). It delegates to the weight-diff package, which streams and checks."""

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

if __name__ == "__main__":
    main(prog_name="weight_diff.py")
