"""The one-channel-at-a-time training backward of NCHW inputs
(csrc/cpu/backward.cpp, backward_planar) is chosen automatically only
where x and dy together exceed the last-level cache, too large for most of
the suite. Here the torch-reference tests run again in a subprocess with
it forced on (BNEXT_PLANAR_BACKWARD=1; the choice is read once per
process), and once with it forced off, so both backward paths are checked
against torch whichever the machine would pick."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SELECTION = [str(TESTS / "test_reference.py"), str(TESTS / "test_autograd.py"),
             str(TESTS / "test_numerics.py")]


@pytest.mark.parametrize("forced", ["1", "0"])
def test_reference_suite_with_planar_backward_forced(forced):
    env = dict(os.environ, BNEXT_PLANAR_BACKWARD=forced)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SELECTION],
        env=env, cwd=TESTS.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
