"""The rendezvous store that the trainer hosts for its data-plane groups."""

from __future__ import annotations

import datetime
import logging
import secrets
import socket
import time

from torch.distributed import TCPStore

from weightsync.core import InvalidArgument

__all__ = ["TrainerStore"]

log = logging.getLogger(__name__)

# Reaching one's own listening socket takes milliseconds; a few seconds covers a loaded host.
_SELF_PROBE_TIMEOUT_S = 5.0


def _probe_own_listener(listener: socket.socket, host: str, port: int, timeout_s: float) -> None:
    """Dials host:port and checks that the connection arrives at `listener`, else raises OSError.

    Catches an advertised host that is not this machine: unreachable, black-holed, or
    answered by something else (a proxy), which would otherwise leave TCPStore's own
    client dialling it for the store's whole timeout, silently.
    """
    nonce = secrets.token_bytes(16)
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as dialer:
        dialer.sendall(nonce)
        listener.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(max(0.01, deadline - time.monotonic()))
                    got = b""
                    while len(got) < len(nonce):
                        chunk = conn.recv(len(nonce) - len(got))
                        if not chunk:
                            break
                        got += chunk
                if got == nonce:
                    return
                # Someone else's connection: keep looking for ours until the deadline.
        except TimeoutError:
            raise OSError(f"the connection to {host}:{port} did not arrive at this process's listening socket") from None
        finally:
            listener.settimeout(None)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class TrainerStore:
    """The rendezvous store that the trainer hosts, listening before the coordinator knows its port.

    `host` is the address that receivers dial; the listening socket binds `bind_host`
    (default: `host`), and port 0 picks a free port, read back from `.port` and passed
    to the coordinator in BeginUpdate. The store has no authentication: bind it to an
    interface that only the fleet can reach.
    """

    def __init__(self, host: str, port: int = 0, *, bind_host: str | None = None, timeout_s: float = 300.0) -> None:
        if not host:
            raise ValueError("TrainerStore host must be the address receivers dial, e.g. '10.0.0.5'")
        if not 0 <= port < 65536:
            raise ValueError(f"TrainerStore port {port}: expected 0..65535 (0 picks a free port)")
        if timeout_s <= 0:
            raise ValueError(f"TrainerStore timeout_s {timeout_s}: expected > 0")
        family = socket.getaddrinfo(bind_host or host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_host or host, port))
            sock.listen(1024)
            bound_port = sock.getsockname()[1]
        except OSError as e:
            sock.close()
            raise ValueError(f"cannot listen on {bind_host or host}:{port} for the rendezvous store: {e}") from e
        # TCPStore's master also dials `host` itself and waits up to timeout_s, saying nothing;
        # so do the daemons. Check first, within this trainer's own timeout, that `host` leads here.
        try:
            _probe_own_listener(sock, host, bound_port, min(timeout_s, _SELF_PROBE_TIMEOUT_S))
        except OSError as e:
            sock.close()
            raise InvalidArgument(
                f"rendezvous host {host!r} does not reach this trainer's data-plane store (listening on "
                f"{bind_host or host}:{bound_port}): {e}. Advertise an address of this machine that the daemons "
                "can dial: rendezvous_host= in WeightSync(...), --rendezvous-host for `weightsync push`"
            ) from e
        # The store's event loop takes ownership of the descriptor and closes it.
        fd = sock.detach()
        self._host = host
        self._store: TCPStore | None = TCPStore(
            host, bound_port, is_master=True, wait_for_workers=False, timeout=_timedelta(timeout_s), master_listen_fd=fd
        )
        self._port = bound_port
        log.info("rendezvous store listening on %s:%d (advertised as %s)", bind_host or host, bound_port, host)

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def store(self) -> TCPStore:
        if self._store is None:
            raise ValueError("TrainerStore is closed")
        return self._store

    def close(self) -> None:
        """Drops this object's hold on the store; it stops listening once the groups built on it are gone too."""
        self._store = None

    def __enter__(self) -> "TrainerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
