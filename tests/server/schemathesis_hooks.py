"""Schemathesis hooks for tests/server/test_schemathesis.py (loaded by its CLI through ``SCHEMATHESIS_HOOKS``).

The document declares requirements and rank as ``format: cel-expression``: a grammar no JSON Schema pattern
states. Positive test data for them comes from here — expressions over a host's attributes that the server must
accept — so that "schema-valid requests are accepted" is checked on them too.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

ATTRIBUTES = ["memory", "cores", "cpuspeed", "disk"]

expressions = st.one_of(
    st.sampled_from(["true", "false", 'os == "linux"', 'cpu == "x86_64"']),
    st.builds(lambda a, op, n: f"{a} {op} {n}", st.sampled_from(ATTRIBUTES), st.sampled_from([">=", "<", "=="]),
              st.integers(0, 1 << 20)),
)

schemathesis.openapi.format("cel-expression", expressions)
