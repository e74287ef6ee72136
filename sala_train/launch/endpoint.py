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
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from sala_train.config.typed import ConfigError

# How long a torch rendezvous takes to answer a client (milliseconds on a LAN); one that has not
# answered by then is not one.
STORE_ANSWER_SECONDS = 10.0
CONNECT_SECONDS = 3.0
FIRST_WORD_SECONDS = 1.0  # (a program that speaks first, an SSH server, does so at once)
IMPORT_SECONDS = 30.0  # (the probing process imports torch)


def check_rendezvous_endpoint(addr: str, port: int) -> None:
    """ConfigError if ``addr`` does not resolve here, or if a program that is not a torch rendezvous
    answers at ``addr:port``. Nothing listening there is fine: node 0's torchrun has not started
    yet (or this is node 0); so is anything this check cannot judge (a name server that failed for
    now, a tunnel that closes connections until node 0 is up): torchrun then retries as before."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # ("temporary failure in name resolution")
            return
        raise ConfigError([f"launcher.master_addr: {addr!r} does not resolve on this machine ({exc.strerror}); "
                           "give node 0's address as every node reaches it"]) from exc  # fmt: skip
    why_not = _not_a_rendezvous(addr, port, infos)
    if why_not is not None:
        raise ConfigError([f"launcher.master_port: a program that is not a torch rendezvous holds {addr}:{port} "
                           f"({why_not}); choose a free launcher.master_port, the same on every node"])  # fmt: skip


def _not_a_rendezvous(
    addr: str, port: int, infos: Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]]
) -> str | None:
    """Why the program at ``addr:port`` is not a TCPStore, or None (it is, nothing listens, or it
    cannot be told). A TCPStore says nothing until its client speaks, and then answers."""
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(CONNECT_SECONDS)
            try:
                probe.connect(address)
            except OSError:  # refused, unreachable, or filtered: torchrun will say so itself
                continue
            probe.settimeout(FIRST_WORD_SECONDS)
            try:
                first = probe.recv(64)
            except TimeoutError:  # silent, as a TCPStore is: ask it as torch's client does
                return _no_store_answer(addr, port)
            except OSError:  # reset
                return None
            if not first:  # closed at once (a tunnel whose far end is not up yet)
                return None
            return f"it spoke first: {first.decode(errors='replace').strip()[:40]!r}"
    return None


def _no_store_answer(addr: str, port: int) -> str | None:
    """torch's own TCPStore client, in a process of its own: it has no timeout on the reply it waits
    for, and logs C++ stack frames on each retry, which a killed process takes with it. Timed from
    when it has imported torch (seconds, more on a busy node)."""
    import select

    client = (
        "import sys, datetime, torch\n"
        "from torch._C._distributed_c10d import TCPStore\n"
        "print('asking', flush=True)\n"
        "TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, wait_for_workers=False,\n"
        f"         timeout=datetime.timedelta(seconds={STORE_ANSWER_SECONDS}))\n"
    )
    argv = [sys.executable, "-c", client, addr, str(port)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as asking:
        try:
            assert asking.stdout is not None
            if not select.select([asking.stdout], [], [], IMPORT_SECONDS)[0] or not asking.stdout.readline():
                return None  # (torch did not import in time here: not for this check to judge)
            code = asking.wait(timeout=STORE_ANSWER_SECONDS)
        except subprocess.TimeoutExpired:
            return f"it accepted a connection and gave no answer in {STORE_ANSWER_SECONDS:g} s"
        finally:
            asking.kill()
    return None if code == 0 else "it did not answer as a torch rendezvous does"
