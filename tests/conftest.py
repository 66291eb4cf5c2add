"""Test-wide set-up: shared helpers (``parity``, ``dist/_spawn``) importable as top-level modules."""

import os
import sys

TESTS = os.path.dirname(__file__)
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(TESTS, "dist"))
