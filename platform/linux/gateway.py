"""Gateway mode: the kernel setting that lets forwarded traffic reach the loopback-only proxy.

The redirect DNATs TCP arriving on a gateway interface (docker0, virbr0) to 127.0.0.1:<proxy_port>
rather than `redirect`ing it to the interface's own address, so the proxy still listens on
loopback only. Linux drops packets for 127.0.0.0/8 that arrive on any other interface unless
`net.ipv4.conf.<iface>.route_localnet` is 1 (kube-proxy does the same for its NodePorts): llmtap
sets it on those interfaces only, and puts back the value it found. (The redirect also drops
packets from those interfaces to 127.0.0.0/8 that it did not DNAT: otherwise a container could
reach every loopback service here, CVE-2020-8558.) The value found is written to
a file before anything changes, so when the supervisor dies without cleaning up, its guardian, the
next start and `llmtap cleanup` still restore it.

IPv6 has no such setting (a packet for ::1 from outside is always dropped) and the alternatives
need a listener on a non-loopback address, so the rules reject IPv6 TCP to the targets from those
interfaces with a TCP reset instead: clients fall back to IPv4 at once, and nothing bypasses the tap.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from llmtap.atomic import write_atomic
from llmtap.errors import RuntimeFailure

SYSCTL_ROOT = Path("/proc/sys/net/ipv4/conf")
RECORD_NAME = "route_localnet.json"  # in run_dir: a tmpfs, cleared at boot like the sysctls


def record_path(run_dir: Path) -> Path:
    return run_dir / RECORD_NAME


class RouteLocalnet:
    """Keeps route_localnet at 1 on the gateway interfaces that exist (they may come later)."""

    def __init__(self, interfaces: tuple[str, ...], record: Path, root: Path = SYSCTL_ROOT) -> None:
        self.interfaces = interfaces
        self.record = record
        self.root = root

    def enable(self) -> tuple[list[str], list[str]]:
        """(interfaces set now, interfaces missing). Safe to call again: Docker recreating
        docker0 resets the setting, and the next call sets it again."""
        changed, missing = [], []
        for name in self.interfaces:
            setting = self.root / name / "route_localnet"
            try:
                previous = setting.read_text().strip()
            except FileNotFoundError:
                missing.append(name)
                continue
            if previous == "1":
                continue
            saved = _load(self.record)
            try:
                if name not in saved:  # the first value found is the one to restore
                    _save(self.record, {**saved, name: previous})
                setting.write_text("1")
            except OSError as exc:
                raise RuntimeFailure(f"cannot set route_localnet on {name}: {exc.strerror}") from None
            changed.append(name)
        return changed, missing


def restore(record: Path, root: Path = SYSCTL_ROOT) -> list[str]:
    """Puts back every recorded value; the interfaces restored. Safe to call any time."""
    saved = _load(record)
    restored = []
    for name, previous in saved.items():
        if previous not in ("0", "1"):
            continue
        with contextlib.suppress(FileNotFoundError):  # the interface went away with its setting
            (root / name / "route_localnet").write_text(previous)
            restored.append(name)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    return restored


def _load(record: Path) -> dict[str, str]:
    try:
        data = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save(record: Path, saved: dict[str, str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(saved).encode(), mode=None)  # never half-written, whenever killed
