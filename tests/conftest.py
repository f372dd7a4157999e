"""Shared test helpers (tests/support/) importable from every test folder; the unit tests mirror the package
(tests/<subpackage>/), the end-to-end ones live in tests/end_to_end/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "support"))
