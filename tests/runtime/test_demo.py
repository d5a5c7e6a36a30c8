"""`weightsync demo`, the README's main command: real vLLM engines in separate processes, several rounds."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_commits_every_round_and_restores(tmp_path):
    """The demo exits 0: every round committed on both engines, samples changed with the weights and served versions, the original tokens came back."""
    out = subprocess.run([sys.executable, "-m", "weightsync.runtime.cli", "demo", "--rounds", "2", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "every round committed with matching checksums" in text
    assert "original tokens are back" in text
    for version in (1, 2, 3):
        assert f"engine-0 (version {version})" in text and f"engine-1 (version {version})" in text
    assert text.count("engine-0=OK, engine-1=OK") == 3
