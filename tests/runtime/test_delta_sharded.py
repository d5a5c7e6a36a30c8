"""Delta rounds from a sharded trainer: a real 2-rank FSDP2 trainer on gloo into memory daemons (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.faults.fleet import ROOT, Fleet, wait_for

pytestmark = pytest.mark.slow

_TRAINER_TIMEOUT_S = 400.0  # three rounds and three training steps, 5 processes on a loaded 2-core machine


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, num_daemons=2)
    yield f
    f.close()


def test_two_rank_fsdp2_trainer_pushes_dense_then_deltas_and_engines_hold_its_bytes(fleet, tmp_path):
    """WeightSync(delta=True) on 2 FSDP2 ranks: a refused push raises on both, then version 1 dense, 2 a delta on its own base, 3 a delta on an explicit sharded base; engines equal the trainer's bf16 weights after each."""
    workdir = tmp_path / "trainer"
    workdir.mkdir()
    init_file = tmp_path / "trainer-init"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.runtime._sharded_trainer", "--coordinator", fleet.address, "--rank", str(r), "--world", "2",
             "--init-file", str(init_file), "--workdir", str(workdir)],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=open(fleet.logs / f"trainer{r}.log", "w"), stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    rounds: list[dict] = []
    try:
        for v in (1, 2, 3):
            wait_for(lambda: _lines(workdir) >= v or any(p.poll() is not None for p in procs), _TRAINER_TIMEOUT_S, f"round {v} reported")
            rounds = [json.loads(line) for line in (workdir / "rounds.jsonl").read_text().splitlines()]
            assert len(rounds) == v, (rounds, _logs(fleet))
            assert rounds[-1]["state"] == "COMMITTED", rounds[-1]
            fleet.weights[v] = workdir / f"v{v}.safetensors"
            # Between rounds: every engine serves v, clean, holding exactly the trainer's bf16 weights of v.
            fleet.assert_consistent(v)
            (workdir / f"checked-v{v}").touch()
        codes = [p.wait(_TRAINER_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert codes == [0, 0], _logs(fleet)  # both ranks also raised on the refused push before version 1
    assert "expected base_version" in (workdir / "refused.txt").read_text()
    encodings = [{d: v[1] for d, v in r["daemons"].items()} for r in rounds]
    assert encodings == [{"mem0": "dense", "mem1": "dense"}, {"mem0": "delta", "mem1": "delta"}, {"mem0": "delta", "mem1": "delta"}]
    dense_bytes = rounds[0]["daemons"]["mem0"][2]
    for r in rounds[1:]:
        for d, (_, _, received) in r["daemons"].items():
            # An AdamW step at lr 3e-6 changes a few % of the bf16 elements: the delta is a fraction of dense.
            assert 0.001 * dense_bytes < received < 0.3 * dense_bytes, (r["version"], d, received, dense_bytes)


def _lines(workdir) -> int:
    try:
        return len((workdir / "rounds.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _logs(fleet) -> dict[int, str]:
    return {r: (fleet.logs / f"trainer{r}.log").read_text()[-3000:] for r in range(2)}
