"""Content hashes: sha256 of canonical JSON (sorted keys, no spaces, no NaN), for specs, sub-specs and run inputs.

`spec_hash` is that of the validated spec, so comments, key order, formatting and `extends` versus the same content
written flat all give one hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_hash(data: Any) -> str:
    """sha256 (hex) of the canonical JSON of `data`."""
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def spec_hash(spec) -> str:
    """sha256 of the canonical JSON of the validated spec (defaults filled, `extends` resolved)."""
    return canonical_hash(spec.model_dump(mode="json"))
