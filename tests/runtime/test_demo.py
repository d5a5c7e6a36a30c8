"""`weightsync demo`, the README's main command: real vLLM engines in separate processes, several rounds."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_commits_every_round_and_restores():
    """The demo exits 0: every round committed on both engines, samples changed with the weights and served versions, the original tokens came back; it prints its commands and versions and removes its temp dir."""
    # A short TMPDIR of our own: vLLM's IPC socket paths under it must fit in 107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="wsdemo", dir="/tmp"))
    try:
        out = subprocess.run([sys.executable, "-m", "weightsync.runtime.cli", "demo", "--rounds", "2"],
                             capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(tmp)})
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith("weightsync-demo-")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert "every round committed with matching checksums" in text
    assert "original tokens are back" in text
    for version in (1, 2, 3):
        assert f"engine-0 (version {version})" in text and f"engine-1 (version {version})" in text
    assert text.count("engine-0=OK, engine-1=OK") == 3
    # Copyable commands for every role, and the versions a bug report needs.
    assert " coordinator --listen 127.0.0.1:" in text
    assert text.count("VLLM_CACHE_ROOT=") == 2 and " serve " in text and "--kv-cache-memory-bytes 67108864" in text
    assert " push --coordinator 127.0.0.1:" in text and "--version 3" in text
    assert "torch " in text and "vLLM 0.32" in text
    assert not leftovers, "the demo's temp dir is removed on exit"
