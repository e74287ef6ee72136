"""The multinode rendezvous address, checked before a node starts torchrun.

torchrun meets the nodes through a TCPStore at ``master_addr:master_port``. Two mistakes there
cost a user many minutes for one unclear line: a host name this machine cannot resolve is retried
for about 90 seconds, ending in C++ stack frames; and a port held by a program that is not a torch
rendezvous (a web server, a notebook) is joined as if it were one, and the node then waits in
silence (the store's client has no timeout on the reply it waits for) until the rendezvous gives up
about 15 minutes later. Both are found here in seconds.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sala_train.config.typed import ConfigError

# How long a torch rendezvous takes to answer a client (milliseconds on a LAN); one that has not
# answered by then is not one.
STORE_ANSWER_SECONDS = 10.0
CONNECT_SECONDS = 3.0


def check_rendezvous_endpoint(addr: str, port: int) -> None:
    """ConfigError if ``addr`` does not resolve here, or if a program that is not a torch rendezvous
    answers at ``addr:port``. Nothing listening there is fine: node 0's torchrun has not started
    yet (or this is node 0)."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError([f"launcher.master_addr: {addr!r} does not resolve on this machine ({exc.strerror}); "
                           "give node 0's address as every node reaches it"]) from exc  # fmt: skip
    if not _something_listens(infos):
        return
    why_not = _not_a_rendezvous(addr, port)
    if why_not is not None:
        raise ConfigError([f"launcher.master_port: a program that is not a torch rendezvous holds {addr}:{port} "
                           f"({why_not}); choose a free launcher.master_port, the same on every node"])  # fmt: skip


def _something_listens(infos: Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]) -> bool:
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(CONNECT_SECONDS)
            try:
                probe.connect(address)
            except OSError:  # refused, unreachable, or filtered: torchrun will say so itself
                continue
            return True
    return False


def _not_a_rendezvous(addr: str, port: int) -> str | None:
    """Why the program at ``addr:port`` is not a TCPStore, or None if it answers as one. The client
    runs in a thread that is left behind if it never returns (it cannot be interrupted)."""
    from torch._C._distributed_c10d import TCPStore

    outcome: list[str | None] = []

    def connect() -> None:
        try:
            TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=STORE_ANSWER_SECONDS),
                     wait_for_workers=False)  # fmt: skip
            outcome.append(None)
        except Exception as exc:  # (torch raises DistNetworkError, DistStoreError, RuntimeError)
            outcome.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    client = threading.Thread(target=connect, name="sala-train-rendezvous-probe", daemon=True)
    client.start()
    client.join(STORE_ANSWER_SECONDS)
    if not outcome:
        return f"it accepted a connection and gave no answer in {STORE_ANSWER_SECONDS:g} s"
    return outcome[0]
