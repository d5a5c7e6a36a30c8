"""The S x M x T matrix of routed rounds on the emulated fleet, each (M, T, rate) beside today's dense round.

    python bench/fleet_matrix.py --cells "S,M,T,RATE;..." --model-mib B --json OUT [--rounds N]

Runs bench/fleet_round.py once per cell (S trainer ranks, M engines of T ranks, every link RATE
Mbit/s), and once per distinct (M, T, RATE) with --dense (trainer rank 0 sends the whole model
to every rank: today's round), one after another on this machine. Writes every run's full result
under `runs` and one row per cell under `table` (round time, speed of light, ratio, the dense
round's time and its ratio to this round's, wire bytes per host: each trainer host's tx, each
receiver's rx and its fraction of the model), with `uptime` before and after each run: the cores
are shared. Prints the table as Markdown. Needs root (as fleet_round.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cells(text: str) -> list[tuple[int, int, int, float]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        fields = part.split(",")
        if len(fields) != 4:
            raise ValueError(f"--cells: expected 'S,M,T,RATE' per cell, got {part!r}")
        s, m, t, rate = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
        if min(s, m, t) < 1 or rate <= 0:
            raise ValueError(f"--cells: expected S, M, T >= 1 and RATE > 0, got {part!r}")
        out.append((s, m, t, rate))
    return out


def _uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _run(args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "bench/fleet_round.py", *extra, "--model-mib", str(args.model_mib), "--rounds", str(args.rounds), "--json", str(out)]
    before = _uptime()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_s)
    after = _uptime()
    if res.returncode != 0:
        print(f"FAILED: {' '.join(extra)}: {res.stderr[-2000:]}", file=sys.stderr, flush=True)
        return {"failed": True, "args": extra, "stderr_tail": res.stderr[-2000:], "load_before": before, "load_after": after}
    print(res.stdout.strip().splitlines()[-1], flush=True)
    r = json.loads(out.read_text())
    r["load_before"], r["load_after"] = before, after
    return r


def _row(cell: tuple[int, int, int, float], r: dict, dense: dict | None, model_bytes: int) -> dict:
    s, m, t, rate = cell
    wire = r["wire_bytes_per_host"]
    trainers = [f"t{i}" for i in range(s)]
    receivers = [h for h in wire if h.startswith("e")]
    row = {
        "S": s, "M": m, "T": t, "link_mbit": rate, "hosts": r["hosts"],
        "achieved_s": r["achieved_s"], "achieved_s_all": r["achieved_s_all"],
        "speed_of_light_s": r["speed_of_light_s"], "ratio": r["ratio"],
        "receiver_bound_s": r["receiver_bound_s"], "sender_bound_s": r["sender_bound_s"],
        "trainer_tx_bytes": {h: wire[h]["tx_bytes"] for h in trainers},
        "receiver_rx_bytes": {h: wire[h]["rx_bytes"] for h in receivers},
        "receiver_tx_bytes": {h: wire[h]["tx_bytes"] for h in receivers},
        "receiver_rx_fraction_of_model": {h: wire[h]["rx_bytes"] / model_bytes for h in receivers},
        "load_before": r["load_before"], "load_after": r["load_after"],
    }
    if dense is not None and not dense.get("failed"):
        row["dense_achieved_s"] = dense["achieved_s"]
        row["dense_ratio"] = dense["ratio"]
        row["speedup_vs_dense"] = dense["achieved_s"] / r["achieved_s"]
    return row


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| S | M | T | link Mbit/s | hosts | achieved_s (median of rounds) | speed of light, s | ratio | dense round, s (ratio) | speedup vs dense | tx per trainer host, MB | rx per receiver, MB (fraction of model) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in rows:
        tx = w["trainer_tx_bytes"].values()
        rx = w["receiver_rx_bytes"].values()
        fr = w["receiver_rx_fraction_of_model"].values()
        dense = f"{w['dense_achieved_s']:.3f} ({w['dense_ratio']:.3f})" if "dense_achieved_s" in w else "-"
        speed = f"{w['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in w else "-"
        lines.append(
            f"| {w['S']} | {w['M']} | {w['T']} | {w['link_mbit']:g} | {w['hosts']} | {w['achieved_s']:.3f} "
            f"({', '.join(f'{x:.3f}' for x in w['achieved_s_all'])}) | {w['speed_of_light_s']:.3f} | **{w['ratio']:.3f}** | {dense} | {speed} "
            f"| {min(tx) / 1e6:.2f}-{max(tx) / 1e6:.2f} | {min(rx) / 1e6:.2f}-{max(rx) / 1e6:.2f} ({min(fr):.3f}-{max(fr):.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", required=True, help="'S,M,T,RATE;...': trainer ranks, engines, ranks per engine, link Mbit/s")
    p.add_argument("--model-mib", type=float, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", required=True)
    p.add_argument("--workdir", default="/tmp/fleet_matrix", help="each run's own JSON lands here")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    args = p.parse_args(argv)
    try:
        cells = _cells(args.cells)
    except ValueError as e:
        p.error(str(e))
    if os.geteuid() != 0:
        p.error("an emulated fleet needs root (network namespaces, veth links, tc)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = int(args.model_mib * (1 << 20))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runs: dict[str, dict] = {}
    rows = []
    for cell in cells:
        s, m, t, rate = cell
        key = f"dense_m{m}_t{t}_{rate:g}mbit"
        if key not in runs:
            runs[key] = _run(args, ["--dense", "--engines", str(m), "--tp", str(t), "--link-mbit", f"{rate:g}"], work / f"{key}.json")
        name = f"s{s}_m{m}_t{t}_{rate:g}mbit"
        runs[name] = _run(args, ["--trainer-ranks", str(s), "--engines", str(m), "--tp", str(t), "--link-mbit", f"{rate:g}"], work / f"{name}.json")
        if not runs[name].get("failed"):
            rows.append(_row(cell, runs[name], runs[key], model_bytes))
        # Written after every run: a long matrix keeps what it measured if it is stopped.
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "started": started,
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "model_mib": args.model_mib, "rounds": args.rounds, "table": rows, "runs": runs,
        }, indent=1) + "\n")
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
