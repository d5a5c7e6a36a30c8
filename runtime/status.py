"""`weightsync status`: the fleet and recent rounds as a table or JSON."""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf import json_format

from weightsync.v1 import weightsync_pb2 as pb

__all__ = ["format_status", "status_json"]


def status_json(daemons: pb.ListDaemonsResponse, rounds: pb.ListRoundsResponse) -> str:
    return json.dumps(
        {
            "daemons": json_format.MessageToDict(daemons, always_print_fields_with_no_presence=True)["daemons"],
            "committed_version": daemons.committed_version,
            "version_floor": daemons.version_floor,
            "rounds": json_format.MessageToDict(rounds, always_print_fields_with_no_presence=True)["rounds"],
        },
        indent=2,
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _ago(unix_s: float, now: float) -> str:
    return f"{now - unix_s:.1f}s ago" if unix_s else "-"


def format_status(daemons: pb.ListDaemonsResponse, rounds: pb.ListRoundsResponse) -> str:
    now = dt.datetime.now().timestamp()
    d_rows = [
        [
            d.daemon_id,
            pb.DaemonState.Name(d.state).removeprefix("DAEMON_STATE_"),
            str(d.served_version) if d.served_version >= 0 else "none",
            " ".join(f for f, on in (("dirty", d.dirty), ("stale", d.stale), ("unknown-version", d.unknown_version)) if on) or "ok",
            _ago(d.last_heartbeat_unix_s, now),
            d.engine,
            str(d.num_ranks),
            d.host,
        ]
        for d in daemons.daemons
    ]
    r_rows = [
        [
            r.update_id,
            str(r.version),
            pb.RoundState.Name(r.state).removeprefix("ROUND_STATE_"),
            str(len(r.participants)),
            f"{r.duration_s:.3f}",
            f"{r.total_bytes / 2**20:.1f}",
            ", ".join(
                f"{x.daemon_id}={pb.ResultStatus.Name(x.status).removeprefix('RESULT_STATUS_')}" for x in r.results
            ),
        ]
        for r in rounds.rounds
    ]
    committed = daemons.committed_version if daemons.committed_version >= 0 else "none (no version committed yet)"
    floor = (
        f"{daemons.version_floor} (the next round's version must exceed it)" if daemons.version_floor >= 0 else "none (any version may begin)"
    )
    return "\n".join(
        [
            f"committed version: {committed}   version floor: {floor}",
            "",
            _table(["DAEMON", "STATE", "VERSION", "FLAGS", "HEARTBEAT", "ENGINE", "RANKS", "HOST"], d_rows),
            "",
            _table(["UPDATE", "VERSION", "STATE", "DAEMONS", "SECONDS", "MIB", "RESULTS"], r_rows),
        ]
    )
