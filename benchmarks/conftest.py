import sys
from pathlib import Path

# The benchmarks reuse the tests' builders.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
