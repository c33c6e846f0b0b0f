"""The resident backward (planar reduction and grad_input over channel
blocks kept cached between the two passes) against torch, forced on in a
subprocess: see resident_cases.py."""

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("resident_cases.py")


def test_resident_walk_matches_torch():
    env = dict(os.environ, BNEXT_RESIDENT="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        env=env, cwd=CASES.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
