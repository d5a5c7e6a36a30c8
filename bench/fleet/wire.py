"""A userspace cable with delay and loss: two TAP devices and a process that carries frames between them.

This kernel has no netem (CONFIG_NET_SCH_NETEM is not set, nor fq for timed departures, nor
act_gact for random drops), so a host whose link needs delay or loss gets this cable instead of
a veth pair: a TAP device in the host's namespace, one in the switch namespace, and this
process in between, which holds every frame for delay_ms and drops loss_pct of them, each
direction. Rates are still set by htb on both TAP devices, as on veth links.

    python -m bench.fleet.wire HOST_NETNS HOST_IF SWITCH_NETNS SWITCH_IF

It prints `ready` once both devices exist and then reads `DELAY_MS LOSS_PCT` lines on stdin
(the first line sets the starting values; later lines change them mid-run). The devices are
not persistent: they vanish when this process ends, whatever ends it.

Python is fast enough for the links that need impairment (a few thousand frames per second);
links that need only a rate keep kernel veth pairs.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import threading
import time

__all__ = ["main"]

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_MAX_FRAME_BYTES = 65536


def _setns(netns: str) -> None:
    # os.setns arrived in Python 3.12; this project runs on 3.11.
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _open_tap(netns: str, ifname: str) -> int:
    """A TAP device named ifname, created inside netns (a device belongs to the namespace it is made in)."""
    _setns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


class _Impairment:
    """Delay and loss, changed by the stdin thread and read by the frame loop."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.loss = 0.0
        self.changed = threading.Event()

    def read_lines(self) -> None:
        for line in sys.stdin:
            parts = line.split()
            if len(parts) != 2:
                continue
            self.delay_s, self.loss = float(parts[0]) / 1e3, float(parts[1]) / 100
            self.changed.set()
        os._exit(0)  # the orchestrator closed our stdin: it is gone, and so is this cable


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    host_netns, host_if, switch_netns, switch_if = argv
    host_fd = _open_tap(host_netns, host_if)
    switch_fd = _open_tap(switch_netns, switch_if)
    peer = {host_fd: switch_fd, switch_fd: host_fd}
    impairment = _Impairment()
    threading.Thread(target=impairment.read_lines, daemon=True).start()
    print("ready", flush=True)
    rng = random.Random()
    pending: list[tuple[float, int, int, bytes]] = []  # (due, seq, out_fd, frame)
    last_due = {host_fd: 0.0, switch_fd: 0.0}
    seq = 0
    while True:
        timeout_s = max(0.0, pending[0][0] - time.monotonic()) if pending else 0.5
        readable, _, _ = select.select([host_fd, switch_fd], [], [], timeout_s)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    frame = os.read(fd, _MAX_FRAME_BYTES)
                except BlockingIOError:
                    break
                if impairment.loss and rng.random() < impairment.loss:
                    continue
                out = peer[fd]
                # A frame never overtakes an earlier one of its direction, even when the delay shrinks.
                due = max(now + impairment.delay_s, last_due[out])
                last_due[out] = due
                heapq.heappush(pending, (due, seq, out, frame))
                seq += 1
        while pending and pending[0][0] <= time.monotonic():
            _, _, out, frame = heapq.heappop(pending)
            try:
                os.write(out, frame)
            except OSError:
                pass  # the device is down (a cut cable) or its queue is full: the frame is lost, as on a wire


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
