"""The one lifecycle of `llmtap run` (llmtap.lifecycle) with a fake ProxyHost and a fake backend:
its order, its undo in `finally` whatever happens, and healing only where the host can."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from llmtap.config import load_config
from llmtap.errors import RuntimeFailure
from llmtap.lifecycle import EventHandler, Lifecycle
from llmtap.platform.base import RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.proxy import ProxySettings
from llmtap.targets import Lookup, TargetResolver

Events = list[str]


class FakeBackend(RedirectBackend):
    name = "fake"
    events: ClassVar[Events] = []
    dead = False

    @classmethod
    def available(cls) -> bool:
        return True

    def install(self, addresses: TargetAddresses) -> None:
        self.events.append("install")

    def update_targets(self, addresses: TargetAddresses) -> None:
        pass

    def remove(self) -> None:
        self.events.append("remove")

    def alive(self) -> bool:
        return not FakeBackend.dead

    @classmethod
    def rules_present(cls) -> bool:
        return False

    @classmethod
    def cleanup_leftovers(cls) -> bool:
        return False


class FakeHost:
    """A ProxyHost that records each call; `troubles` are what trouble() answers, in turn."""

    def __init__(self, events: Events, heals: bool, troubles: list[str | None] | None = None,
                 start_fails: bool = False) -> None:
        self.events, self.heals, self.troubles = events, heals, troubles or []
        self.start_fails = start_fails
        self.starts = 0

    @property
    def pid(self) -> int:
        return 4242 + self.starts

    def prepare(self, settings: ProxySettings, backend_cls: type[RedirectBackend],
                plan: RedirectPlan) -> RedirectBackend | None:
        self.events.append("prepare")
        return None

    def start(self, on_event: EventHandler, stop: threading.Event) -> list[str] | None:
        self.events.append("start")
        self.starts += 1
        if self.start_fails:
            raise RuntimeFailure("the proxy did not start")
        if stop.is_set():
            return None
        on_event({"event": "counters", "counters": {"requests": self.starts}})
        return ["127.0.0.1:8443"]

    def alive(self) -> bool:
        return True

    def trouble(self) -> str | None:
        return self.troubles.pop(0) if self.troubles else None

    def kill(self) -> None:
        self.events.append("kill")

    def stop(self) -> None:
        self.events.append("stop")


class Runner(Lifecycle):
    def __init__(self, config: Any, host: FakeHost, stop_after: int = 3) -> None:
        super().__init__(config, False, host)
        self.events = host.events
        self.rounds = 0
        self.stop_after = stop_after
        self.resolver = TargetResolver(["llm.test"], grace_s=0, refresh_max_s=60, lookup=lambda
                                       _host: Lookup(frozenset({"192.0.2.10"}), None))

    def prepare(self) -> tuple[type[RedirectBackend], ProxySettings]:
        self.events.append("checks")
        return FakeBackend, self.settings(Path("/nonexistent/bundle.pem"), ("127.0.0.1",))

    def redirect_plan(self) -> RedirectPlan:
        return RedirectPlan(proxy_port=8443, service_uid=0)

    def before_redirect(self) -> None:
        self.events.append("services")

    def after_redirect(self) -> None:
        self.events.append("status")

    def tick(self) -> None:
        self.rounds += 1
        if self.rounds >= self.stop_after:
            self.request_stop("test")

    def stop_services(self) -> None:
        self.events.append("stop_services")


@pytest.fixture
def config(tmp_path: Path) -> Any:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        state_dir = "{tmp_path / 'state'}"
        records_dir = "{tmp_path / 'records'}"
        run_dir = "{tmp_path}"
        [targets]
        hosts = ["llm.test"]
        """))
    FakeBackend.events, FakeBackend.dead = [], False
    return load_config(path)


def run(config: Any, host: FakeHost, stop_after: int = 3) -> tuple[int, Runner]:
    FakeBackend.events = host.events
    runner = Runner(config, host, stop_after)
    return runner.run(), runner


def test_the_story_in_order_and_its_undo(config: Any) -> None:
    events: ClassVar[Events] = []
    code, runner = run(config, FakeHost(events, heals=True))
    assert code == 0 and runner.exit_reason == "test"
    assert events == ["checks", "prepare", "start", "services", "install", "status",
                      "remove", "stop_services", "stop"]  # the redirect goes before the proxy
    assert runner.counters == {"requests": 1}  # the host's reports reach the lifecycle
    assert not (config.run_dir / "llmtap.pid").exists()


def test_a_proxy_that_does_not_start_is_never_redirected_to(config: Any) -> None:
    events: ClassVar[Events] = []
    with pytest.raises(RuntimeFailure):
        run(config, FakeHost(events, heals=True, start_fails=True))
    assert "install" not in events and events[-2:] == ["stop_services", "stop"]


def test_a_stop_before_the_proxy_listens_ends_cleanly(config: Any) -> None:
    events: ClassVar[Events] = []
    host = FakeHost(events, heals=True)
    runner = Runner(config, host)
    FakeBackend.events = events
    runner.request_stop("early")
    assert runner.run() == 0
    assert "install" not in events and events[-1] == "stop"


def test_a_failed_proxy_is_killed_before_the_redirect_goes_then_replaced(config: Any) -> None:
    events: ClassVar[Events] = []
    code, runner = run(config, FakeHost(events, heals=True, troubles=["the proxy worker exited"]))
    assert code == 0
    assert events[-3:] == ["remove", "stop_services", "stop"]
    heal = events[events.index("status") + 1:-3]
    assert heal[:2] == ["kill", "remove"]  # its connections' resets still pass the NAT
    assert heal[-2:] == ["start", "install"]  # back only once a new one listens
    assert runner.healer.restarts == 1 and runner.host.pid == 4244


def test_a_host_that_cannot_heal_ends_the_run_with_1(config: Any) -> None:
    events: ClassVar[Events] = []
    code, _ = run(config, FakeHost(events, heals=False, troubles=["the proxy stopped"]))
    assert code == 1
    assert events.count("start") == 1 and events[-3:] == ["remove", "stop_services", "stop"]


def test_a_lost_redirect_is_put_back_without_a_new_proxy(config: Any) -> None:
    events: ClassVar[Events] = []
    host = FakeHost(events, heals=True)
    runner = Runner(config, host, stop_after=3)
    FakeBackend.events = events

    def lose_once() -> None:
        Runner.tick(runner)
        if runner.rounds == 1:
            FakeBackend.dead = True
        elif FakeBackend.dead:
            FakeBackend.dead = False

    runner.tick = lose_once  # type: ignore[method-assign]
    original = runner._install_redirect

    def install() -> None:
        FakeBackend.dead = False
        original()

    runner._install_redirect = install  # type: ignore[method-assign]
    assert runner.run() == 0
    assert events.count("start") == 1 and events.count("install") == 2
    assert "the redirect rules were lost (the fake helper exited)" in runner.healer.status()[
        "last_restart"]["reason"]
