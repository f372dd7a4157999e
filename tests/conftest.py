"""Shared test helpers (tests/support/) importable from every test folder; the unit tests mirror the package
(tests/<subpackage>/), the end-to-end ones live in tests/end_to_end/."""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "support"))
# Specs, prompt files and models written under pytest's temporary folders name one another: allow that folder as a
# user allows a data root (docs/specs.md#safe-by-design); tests/security/ clears it to test the default.
os.environ.setdefault("FLOWOPD_DATA_ROOTS", tempfile.gettempdir())
