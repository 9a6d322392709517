"""What a ``connect()`` costs the client as its local ports fill: why the swarm spreads.

Run: ``.venv/bin/python tests/benchmarks/local_ports.py [--connections 19500]``

A child process listens on loopback and holds what it accepts; this process opens
blocking connections to it, first all from 127.0.0.1, then spread over
``fanout.SOURCE_ADDRESSES`` loopback addresses (``IP_BIND_ADDRESS_NO_PORT``: the port is
still chosen at connect), and prints the CPU per ``connect()`` for each block of 2,000.
Linux only. On the development machine one address went from ~10 µs to ~1.2 ms per
connect past ~14,000 connections; spread, it stayed at ~11-15 µs.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import fanout  # noqa: E402  (SOURCE_ADDRESSES, the open-file limit)

BLOCK = 2000
_HOLDER = """
import socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
print(listener.getsockname()[1], flush=True)
held = []
while True:
    held.append(listener.accept()[0])
"""


def run(connections: int, sources: int) -> list[float]:
    """CPU µs per ``connect()`` for each block of ``BLOCK`` connections."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    held: list[socket.socket] = []
    blocks: list[float] = []
    try:
        began = time.process_time()
        for index in range(connections):
            sock = socket.socket()
            if sources > 1:
                sock.setsockopt(socket.IPPROTO_IP, fanout._BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{2 + index % sources}", 0))
            sock.connect(("127.0.0.1", port))
            held.append(sock)
            if index % BLOCK == BLOCK - 1:
                now = time.process_time()
                blocks.append(1e6 * (now - began) / BLOCK)
                began = now
    finally:
        holder.kill()
        holder.wait()
        for sock in held:
            sock.close()
    return blocks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=19_500)
    args = parser.parse_args()
    if sys.platform != "linux":
        print("Linux only: the loopback addresses and IP_BIND_ADDRESS_NO_PORT are Linux's")
        return 0
    fanout._raise_file_limit()
    for sources in (1, fanout.SOURCE_ADDRESSES):
        blocks = run(args.connections, sources)
        shown = ", ".join(f"{(i + 1) * BLOCK}: {cost:.0f}" for i, cost in enumerate(blocks))
        print(f"from {sources} address(es), CPU µs per connect() by connections held: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
