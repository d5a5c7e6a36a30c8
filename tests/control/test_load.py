"""Load: 256 daemon agents, one in ten disconnecting and reconnecting throughout, rounds keep committing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_256_daemons_with_churn_keep_committing(tmp_path):
    """bench/control_plane.py with 256 agents and 10% churn: every round commits and heartbeats stay cheap for the coordinator."""
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "control_plane.py"), "--daemons", "256", "--rounds", "5",
                        "--churn", "0.1", "--idle-s", "3", "--round-gap-s", "1.0", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    # A daemon that churns out mid-round fails that round for itself (by design); the
    # fleet must still move on: every round ended, and most committed.
    assert len(result["per_round"]) == 5 and result["rounds_committed"] >= 3, result["per_round"]
    assert all(x["participants"] >= 200 for x in result["per_round"]), result["per_round"]
    # Generous bound for a shared 2-core CI machine; BENCHMARKS.md records the measured share (3-5%).
    assert result["coordinator_cpu_share_heartbeats_only"] < 0.5
