"""Where the proxy worker spends its time on kept-alive requests: llmtap against a bare mitmproxy.

Run as root (it builds the same network namespaces as bench/run.py). Needs `py-spy` on PATH (a
measuring tool, not one of llmtap's dependencies: `pip install py-spy` anywhere). For each arm it
starts the daemon, sends kept-alive requests from one client while py-spy samples the worker,
and prints the share of samples by where they were (llmtap's stages, mitmproxy, asyncio, TLS, ...)
and the busiest llmtap functions. `--out FILE` appends the tables as Markdown.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests" / "support"))

from run import TARGET, Arm, start  # noqa: E402
from testbed import new_testbed  # noqa: E402

# The first frame (innermost first) that matches names where a sample is spent.
PLACES = (
    ("llmtap stages (addons)", "(daemon/addons/"),
    ("llmtap parsers", "(daemon/parsers/"),
    ("llmtap records (worker side)", "(daemon/records/"),
    ("llmtap other", "(daemon/"),
    ("mitmproxy HTTP layer", "(mitmproxy/proxy/layers/http"),
    ("mitmproxy TLS layer", "(mitmproxy/proxy/layers/tls"),
    ("mitmproxy addon dispatch", "(mitmproxy/addonmanager"),
    ("mitmproxy other", "(mitmproxy/"),
    ("OpenSSL (pyOpenSSL, cryptography)", "(OpenSSL/"),
    ("asyncio and sockets", "(asyncio/"),
)


# llmtap frames below which the event loop runs everything (its own time is "asyncio")
LOOP_FRAMES = ("start_worker (daemon/worker.py", "serve (daemon/spawner.py", "main (daemon/cli/")


def place(stack: list[str]) -> str:
    """`stack`: frames innermost first, as `function (file:line)`."""
    for frame in stack:
        for name, marker in PLACES:
            if marker in frame:
                return name
    return "other (interpreter, GC, idle)"


Profile = tuple[collections.Counter[str], collections.Counter[str], int]  # places, functions, samples


def llmtap_frame(stack: list[str]) -> str | None:
    """The innermost llmtap frame, unless mitmproxy code runs inside it (the upstream pool's
    connection handler wraps all of mitmproxy's: that time is mitmproxy's)."""
    for frame in stack:
        if "(mitmproxy/" in frame or frame.startswith(LOOP_FRAMES):
            return None
        if "(daemon/" in frame:
            return frame
    return None


def profile_arm(arm: Arm, requests: int, rate: int, keep: Path | None = None) -> Profile:
    pid = arm.worker_pid()
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format",
                                "raw", "--output", raw.name, "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            arm.client("latency", f"{TARGET}/v1/messages", arm.cacert, "--n", str(requests))
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on ^C, not on SIGTERM
            _, complaint = spy.communicate(timeout=30)
        lines = Path(raw.name).read_text().splitlines()
        if keep is not None:
            (keep / f"profile-{arm.name}.txt").write_text("\n".join(lines))
        if not lines:
            sys.exit(f"py-spy recorded nothing from the {arm.name} worker: {complaint.strip()}")
    places: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        stack = list(reversed(stack_text.split(";")))  # py-spy writes outermost first
        total += count
        places[place(stack)] += count
        if (mine := llmtap_frame(stack)) is not None:
            functions[mine] += count
    return places, functions, total


def tables(results: dict[str, Profile], requests: int, rate: int) -> list[str]:
    names = [name for name, _ in PLACES] + ["other (interpreter, GC, idle)"]
    bare, mine = results["bare"][2], results["llmtap"][2]
    lines = [f"## Where the proxy worker's time goes (`bench/profile.py`, {requests} kept-alive "
             "requests from one client)", "",
             f"py-spy sampled each arm's worker {rate} times a second while it was busy (waiting "
             f"in epoll is not counted). llmtap's worker was busy {mine / max(bare, 1):.2f}x as "
             "long as bare mitmproxy's for the same requests. A sample counts where its "
             "innermost recognised frame is.", "",
             "| where the worker's samples were | " + " | ".join(results) + " |",
             "|---|" + "---|" * len(results)]
    for name in names:
        cells = [f"{100 * p[name] / t:.1f}%" if t else "n/a" for p, _, t in results.values()]
        if any(cell not in ("0.0%", "n/a") for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| samples | " + " | ".join(str(t) for _, _, t in results.values()) + " |")
    _, functions, total = results["llmtap"]
    lines += ["", "| llmtap function (innermost llmtap frame of a sample) | share of the worker's samples |",
              "|---|---|"]
    lines += [f"| `{name}` | {100 * count / total:.1f}% |" for name, count in functions.most_common(12)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="a folder for py-spy's raw stacks")
    args = parser.parse_args()
    if not shutil.which("py-spy"):
        sys.exit("bench/profile.py needs py-spy on PATH (pip install py-spy)")
    bed = new_testbed()
    results: dict[str, Profile] = {}
    try:
        bed.create()
        bed.start_upstream()
        for name in ("bare", "llmtap"):
            daemon, _ = start(bed, name)
            arm = Arm(name, bed, daemon)
            try:
                arm.client("latency", f"{TARGET}/v1/messages", arm.cacert, "--n", "200")  # warm
                results[name] = profile_arm(arm, args.requests, args.rate, args.keep)
            finally:
                if daemon:
                    daemon.stop()
    finally:
        bed.destroy()
    text = "\n".join(tables(results, args.requests, args.rate))
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
