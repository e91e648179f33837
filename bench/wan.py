"""An emulated WAN between the test bed's client and upstream namespaces, for bench/run.py.

This kernel has no netem (CONFIG_NET_SCH_NETEM is not set; no modules to load), so the delay is
made in user space: a TUN device in each namespace, host routes (/32, /128) that send the
upstream's addresses through them (more specific than the veth's subnet, so they win while the
WAN is up), and this process between the two, holding each packet `--delay-ms` before passing
it on and dropping `--loss` of them at random. Each direction gets the delay: 20 ms each way is
a 40 ms round trip. Loopback traffic (client to the local proxy) is not delayed, as on a real
machine. Closing the TUN devices (this process ending) removes their routes: the veth is back.

    wan.py --client-ns NS --upstream-ns NS --client-addr A... --upstream-addr A... [--delay-ms 20 --loss 0.01]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def enter(ns: str) -> None:
    with open(f"/run/netns/{ns}") as handle:
        os.setns(handle.fileno(), os.CLONE_NEWNET)


def tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def link(ns: str, name: str, routes: list[tuple[str, str]]) -> int:
    """A TUN device `name` in `ns`, with host routes to each (destination, source) through it."""
    enter(ns)
    fd = tun(name)
    ip("link", "set", name, "up")
    for sysctl in ("all", "default", name):
        Path(f"/proc/sys/net/ipv4/conf/{sysctl}/rp_filter").write_text("0")
    for dest, src in routes:
        family, prefix = ("-6", "128") if ":" in dest else ("-4", "32")
        ip(family, "route", "replace", f"{dest}/{prefix}", "dev", name, "src", src)
    return fd


def relay(ends: dict[int, int], delay_s: float, loss: float) -> None:
    """Forever: each packet read on one end is written to the other `delay_s` later, in order."""
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {fd: collections.deque() for fd in ends}
    poller = select.poll()
    for fd in ends:
        poller.register(fd, select.POLLIN)
    while True:
        due = min((q[0][0] for q in queues.values() if q), default=None)
        wait_ms = -1 if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(wait_ms):
            while True:
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                if loss <= 0 or random.random() >= loss:
                    queues[fd].append((time.monotonic() + delay_s, packet))
        now = time.monotonic()
        for fd, queue in queues.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):  # a full far end drops it, as a link would
                    os.write(ends[fd], queue.popleft()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client-ns", required=True)
    parser.add_argument("--upstream-ns", required=True)
    parser.add_argument("--client-addr", action="append", required=True)  # v4 then v6
    parser.add_argument("--upstream-addr", action="append", required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--loss", type=float, default=0.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    def same_family(address: str, choices: list[str]) -> str:
        return next(c for c in choices if (":" in c) == (":" in address))

    client = link(args.client_ns, "wanc",
                  [(u, same_family(u, args.client_addr)) for u in args.upstream_addr])
    upstream = link(args.upstream_ns, "wanu",
                    [(c, same_family(c, args.upstream_addr)) for c in args.client_addr])
    print("ready", flush=True)
    relay({client: upstream, upstream: client}, args.delay_ms / 1000, args.loss)


if __name__ == "__main__":
    main()
