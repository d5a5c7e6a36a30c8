"""Stalled HTTP/2 streams, written by hand so that a test controls every frame.

usage: python -m tests.control._h2_stall HOST PORT CONNECTIONS STREAMS_PER_CONNECTION [TOKEN [PATH]]

Each stream is a gRPC call (to PATH, default RegisterDaemon; TOKEN "-" for none) that announces a 60 MB message and sends
whatever the coordinator's flow control lets it send (all but its last KiB), then stalls: the bytes
the coordinator agreed to take are what it may have buffered. Prints 'stalled SENT_BYTES'
once no connection has made progress for 2 s, then holds every connection open until killed.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
MESSAGE_BYTES = 60 << 20
CHUNK = 16384  # the default SETTINGS_MAX_FRAME_SIZE


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(n: int) -> bytes:
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    # "Literal header field without indexing, new name": no HPACK tables needed.
    return b"\x00" + _hpack_int(len(name)) + name.encode() + _hpack_int(len(value)) + value.encode()


class _Conn:
    def __init__(self, host: str, port: int, streams: int, token: str, path: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setblocking(False)
        self.buf = b""
        self.conn_window = 65535
        self.initial_window = 65535
        self.out = bytearray(PREFACE + _frame(SETTINGS, 0, 0))
        self.streams: dict[int, dict] = {}
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", f"{host}:{port}"), ("content-type", "application/grpc"), ("te", "trailers")]
        if token and token != "-":
            headers.append(("authorization", f"Bearer {token}"))
        block = b"".join(_literal(k, v) for k, v in headers)
        for i in range(streams):
            sid = 1 + 2 * i
            self.out += _frame(HEADERS, 0x4, sid, block)  # END_HEADERS, not END_STREAM
            self.streams[sid] = {"window": self.initial_window, "pending": b"\x00" + struct.pack(">I", MESSAGE_BYTES), "left": MESSAGE_BYTES - 1024, "open": True}
        self.sent = 0

    def pump(self) -> bool:
        """Reads what the server sent and writes what flow control allows; True if any data moved."""
        moved = False
        try:
            data = self.sock.recv(1 << 16)
            if data:
                self.buf += data
        except BlockingIOError:
            pass
        except OSError:
            return False
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
            if kind == SETTINGS and not flags & 1:
                for off in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[off:off + 6])
                    if ident == 4:  # SETTINGS_INITIAL_WINDOW_SIZE
                        for s in self.streams.values():
                            s["window"] += value - self.initial_window
                        self.initial_window = value
                self.out += _frame(SETTINGS, 1, 0)
            elif kind == PING and not flags & 1:
                self.out += _frame(PING, 1, 0, payload)
            elif kind == WINDOW_UPDATE:
                inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                elif sid in self.streams:
                    self.streams[sid]["window"] += inc
            elif kind == RST_STREAM and sid in self.streams or kind == HEADERS and flags & 1 and sid in self.streams:
                self.streams[sid]["open"] = False
            elif kind == GOAWAY:
                for s in self.streams.values():
                    s["open"] = False
        for sid, s in self.streams.items():
            while s["open"] and s["left"] > 0 and s["window"] > 0 and self.conn_window > 0 and len(self.out) < (1 << 20):
                n = min(CHUNK, s["window"], self.conn_window, s["left"])
                body = s["pending"] + b"w" * (n - len(s["pending"])) if s["pending"] else b"w" * n
                s["pending"] = b""
                self.out += _frame(DATA, 0, sid, body)
                s["window"] -= len(body) if len(body) <= n else n
                self.conn_window -= n
                s["left"] -= n
                self.sent += n
                moved = True
        if self.out:
            try:
                k = self.sock.send(self.out)
                del self.out[:k]
                moved = moved or k > 0
            except BlockingIOError:
                pass
            except OSError:
                pass
        return moved


def main() -> None:
    host, port, num_conns, num_streams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    token = sys.argv[5] if len(sys.argv) > 5 else ""
    path = sys.argv[6] if len(sys.argv) > 6 else "/weightsync.v1.DaemonService/RegisterDaemon"
    conns = [_Conn(host, port, num_streams, token, path) for _ in range(num_conns)]
    last_progress = time.monotonic()
    reported = False
    while True:
        select.select([c.sock for c in conns], [c.sock for c in conns if c.out], [], 0.05)
        sent_before = sum(c.sent for c in conns)
        for c in conns:
            c.pump()
        # Progress is body bytes taken; answering the server's keepalive pings is not.
        if sum(c.sent for c in conns) != sent_before:
            last_progress = time.monotonic()
        if not reported and time.monotonic() - last_progress > 2.0:
            print(f"stalled {sum(c.sent for c in conns)}", flush=True)
            reported = True
        closed = sum(not s["open"] for c in conns for s in c.streams.values())
        if reported and closed != getattr(main, "closed", -1):
            main.closed = closed
            print(f"closed {closed}", flush=True)


if __name__ == "__main__":
    main()
