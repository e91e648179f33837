"""What the filters and dlp stages add to a request: 50 enabled rules plus DLP on a 200 KB prompt.

    python bench/rules_dlp.py [--iterations N] [--size BYTES]

Stand-alone (no root, no network): the two addons run as in the proxy (rules read from a SQLite
store in a temporary state dir, DLP with every built-in detector and two user patterns), on a
Claude Code-like Messages request. Prints median, p95 and p99 per scenario, in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtap.addons.dlp import Dlp
from llmtap.addons.filters import Filters
from llmtap.rules import Rule, RuleStore, validate
from mitmproxy import http
from mitmproxy.test import taddons

WORDS = ("the", "function", "returns", "value", "import", "class", "self", "data", "error", "test",
         "config", "request", "handler", "async", "await", "module", "path", "file", "line")
ALPHANUMERIC = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
DLP_TOML = """
[[dlp.patterns]]
name = "employee_id"
pattern = "EMP-[0-9]{6}"
action = "alert"
[[dlp.patterns]]
name = "internal_ticket"
pattern = "\\\\bINC[0-9]{7}\\\\b"
"""


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def prompt(size: int, with_hits: bool, seed: int = 7) -> bytes:
    """A Messages request of about `size` bytes: a system prompt, then tool use turns."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = []
    body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 8192, "stream": True,
                            "system": [{"type": "text", "text": words(rng, 400)}],
                            "metadata": {"user_id": "user_" + "a" * 60}, "messages": messages}
    turn = 0
    while len(json.dumps(body)) < size:
        tool_id = "toolu_01" + "".join(rng.choice(ALPHANUMERIC) for _ in range(22))
        messages.append({"role": "assistant", "content": [
            {"type": "thinking", "thinking": words(rng, 30), "signature": "Eq" + "x" * 200},
            {"type": "text", "text": words(rng, 20)},
            {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/src/m{turn}.py"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": words(rng, 150)}]})
        turn += 1
    if with_hits:
        messages.append({"role": "user", "content": (
            "deploy to build.internal.corp with AKIAIOSFODNN7EXAMPLE, ticket JIRA-1234, "
            "token ghp_" + "Z" * 36 + " and card 4111 1111 1111 1111")})
    else:
        messages.append({"role": "user", "content": "what does this code do?"})
    return json.dumps(body).encode()


def fifty_rules() -> list[Rule]:
    rules = [
        Rule("header", "remove", "regex", "^x-stainless-"),
        Rule("header", "remove", "exact", "x-debug"),
        Rule("header", "remove", "contains", "tracing"),
        Rule("header", "set", "exact", "x-team", "platform"),
        Rule("header", "set", "contains", "user-agent", "llmtap-client"),
        *(Rule("header", "remove", "exact", f"x-unused-{i}") for i in range(5)),
        Rule("body", "json_path", "exact", "metadata.user_id", "anonymous"),
        Rule("body", "json_path", "exact", "max_tokens", "4096"),
        Rule("body", "json_path", "contains", "messages[-1].content", "TICKET-", pattern="JIRA-"),
        *(Rule("body", "json_path", "exact", f"metadata.absent_{i}.x", "v") for i in range(7)),
        Rule("body", "text_replace", "contains", "internal.corp", "example.com"),
        Rule("body", "text_replace", "regex", r"ticket (JIRA|TICKET)-(\d+)", r"ticket #\2"),
        *(Rule("body", "text_replace", "contains", f"secret-project-{i}", "project") for i in range(18)),
        *(Rule("body", "text_replace", "regex", rf"\bcodename{i}-[a-z]+\b", "codename") for i in range(10)),
    ]
    assert len(rules) == 50, len(rules)
    return [validate(rule) for rule in rules]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def make_flow(body: bytes) -> http.HTTPFlow:
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    flow.request = http.Request.make(
        "POST", "https://api.anthropic.com/v1/messages", body,
        {"content-type": "application/json", "x-stainless-os": "Linux", "user-agent": "bench"})
    return flow


def scenarios(state: Path, rules_dir: Path, empty_dir: Path) -> list[tuple[str, Path, Path]]:
    """(label, state dir with the rules, config file) for each configuration measured."""
    configs = {"builtin": "", "user": DLP_TOML, "off": "[dlp]\nenabled = false\n"}
    paths = {}
    for name, toml in configs.items():
        paths[name] = state / f"{name}.toml"
        paths[name].write_text(f'state_dir = "{state}"\nrecords_dir = "{state}/records"\n{toml}')
    return [
        ("50 rules + DLP (built-ins)", rules_dir, paths["builtin"]),
        ("50 rules + DLP (built-ins + 2 user patterns)", rules_dir, paths["user"]),
        ("50 rules, DLP off", rules_dir, paths["off"]),
        ("no rules + DLP (built-ins)", empty_dir, paths["builtin"]),
        ("no rules + DLP (built-ins + 2 user patterns)", empty_dir, paths["user"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--size", type=int, default=200 * 1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        state = Path(tmp)
        rules_dir, empty_dir = state / "rules", state / "empty"
        rules_dir.mkdir()
        empty_dir.mkdir()
        store = RuleStore(rules_dir / "rules.db")
        for rule in fifty_rules():
            store.add(rule)
        bodies = {kind: prompt(args.size, hits) for kind, hits in (("clean", False), ("with hits", True))}
        cases: list[tuple[str, bytes, Callable[[http.HTTPFlow], None]]] = []
        for label, rules_at, config in scenarios(state, rules_dir, empty_dir):
            filters, dlp = Filters(), Dlp()
            tctx = stack.enter_context(taddons.context(filters, dlp))
            tctx.configure(dlp, llmtap_config_file=str(config))
            tctx.configure(filters, llmtap_state_dir=str(rules_at), llmtap_config_file=str(config))

            def both(flow: http.HTTPFlow, filters: Filters = filters, dlp: Dlp = dlp) -> None:
                filters.requestheaders(flow)
                filters.request(flow)
                dlp.request(flow)

            cases += [(f"{label}, {kind}", body, both) for kind, body in bodies.items()]
        # Round robin, so a busy machine slows every case alike; the first rounds warm up.
        samples: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for round_ in range(args.iterations + 5):
            for label, body, step in cases:
                flow = make_flow(body)
                start = time.perf_counter()
                step(flow)
                if round_ >= 5:
                    samples[label].append((time.perf_counter() - start) * 1000)
    print(f"{'scenario (filters + dlp stages)':<58} {'KB':>4} {'median':>7} {'p95':>7} {'p99':>7} "
          f"{'min':>6}  ms")
    for label, body, _ in cases:
        times = samples[label]
        print(f"{label:<58} {len(body) / 1024:>4.0f} {statistics.median(times):>7.2f} "
              f"{percentile(times, 0.95):>7.2f} {percentile(times, 0.99):>7.2f} {min(times):>6.2f}")


if __name__ == "__main__":
    main()
