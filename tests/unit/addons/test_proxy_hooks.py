"""CachedHooks dispatches events exactly as mitmproxy's own AddonManager does, only faster."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from llmtap.proxy import CachedHooks
from mitmproxy import exceptions, hooks, http, master, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.test import tflow

LIFECYCLE = (http_hooks.HttpRequestHeadersHook, http_hooks.HttpRequestHook,
             http_hooks.HttpResponseHeadersHook, http_hooks.HttpResponseHook)


class Tracer:
    """Notes every flow event it sees; optionally fails, halts or awaits in one of them."""

    def __init__(self, name: str, calls: list[tuple[str, str]], fail: str = "", halt: str = "",
                 slow: str = "") -> None:
        self.name = name
        self.calls = calls
        self.fail, self.halt, self.slow = fail, halt, slow

    def _note(self, event: str) -> Any:
        self.calls.append((self.name, event))
        if event == self.fail:
            raise ValueError(f"{self.name} broke in {event}")
        if event == self.halt:
            raise exceptions.AddonHalt()
        if event == self.slow:
            async def later() -> None:
                await asyncio.sleep(0.01)
                self.calls.append((self.name, f"{event} awaited"))
            return later()
        return None

    def requestheaders(self, flow: http.HTTPFlow) -> Any:
        return self._note("requestheaders")

    def request(self, flow: http.HTTPFlow) -> Any:
        return self._note("request")

    def responseheaders(self, flow: http.HTTPFlow) -> Any:
        return self._note("responseheaders")

    def response(self, flow: http.HTTPFlow) -> Any:
        return self._note("response")

    def update(self, flows: list[Any]) -> Any:
        return self._note("update")


def run_lifecycle(cached: bool, **behaviour: str) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    async def main() -> None:
        proxy = master.Master(options.Options(), with_termlog=False)
        if cached:
            proxy.addons = CachedHooks.replacing(proxy)
        proxy.addons.add(Tracer("first", calls, **behaviour), Tracer("second", calls))
        flow = tflow.tflow(resp=True)
        try:
            for hook in LIFECYCLE:
                await proxy.addons.handle_lifecycle(hook(flow))
        finally:  # its log handler would outlive this event loop
            proxy._legacy_log_events.uninstall()

    asyncio.run(main())
    return calls


@pytest.mark.parametrize("behaviour", [{}, {"fail": "request"}, {"halt": "responseheaders"},
                                       {"slow": "response"}])
def test_every_event_reaches_the_same_handlers_in_the_same_order_as_mitmproxys_manager(
        behaviour: dict[str, str]) -> None:
    assert run_lifecycle(True, **behaviour) == run_lifecycle(False, **behaviour)


def test_a_failing_handler_is_logged_as_mitmproxy_logs_it_and_the_next_one_still_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        calls = run_lifecycle(True, fail="request")
    assert ("second", "request") in calls
    assert "Addon error: first broke in request" in caplog.text


def test_an_addon_added_later_receives_events_and_a_removed_one_no_longer_does() -> None:
    calls: list[tuple[str, str]] = []

    async def main() -> None:
        proxy = master.Master(options.Options(), with_termlog=False)
        proxy.addons = CachedHooks.replacing(proxy)
        first = Tracer("first", calls)
        proxy.addons.add(first)
        flow = tflow.tflow(resp=True)
        await proxy.addons.trigger_event(http_hooks.HttpRequestHook(flow))  # caches the handlers
        proxy.addons.add(Tracer("late", calls))
        await proxy.addons.trigger_event(http_hooks.HttpRequestHook(flow))
        proxy.addons.remove(first)
        await proxy.addons.trigger_event(http_hooks.HttpRequestHook(flow))

    asyncio.run(main())
    assert calls == [("first", "request"), ("first", "request"), ("late", "request"),
                     ("late", "request")]


def test_options_changes_still_reach_the_addons_once() -> None:
    """The replaced manager is unhooked from the options, or configure would run twice."""
    seen: list[set[str]] = []

    class Listener:
        def configure(self, updated: set[str]) -> None:
            seen.append(updated)

    async def main() -> None:
        proxy = master.Master(options.Options(), with_termlog=False)
        stock = proxy.addons
        proxy.addons = CachedHooks.replacing(proxy)
        assert isinstance(stock, AddonManager)
        proxy.addons.add(Listener())
        seen.clear()
        proxy.options.update(ssl_insecure=True)

    asyncio.run(main())
    assert seen == [{"ssl_insecure"}]


def test_events_no_addon_handles_are_cheap_no_ops() -> None:
    async def main() -> list[Any]:
        proxy = master.Master(options.Options(), with_termlog=False)
        proxy.addons = CachedHooks.replacing(proxy)
        await proxy.addons.trigger_event(hooks.UpdateHook([]))
        return proxy.addons.handlers(hooks.UpdateHook([]))

    assert asyncio.run(main()) == []


class Observer(Tracer):
    observes_response = True  # as the parsing, pricing, records and live stages declare


def test_response_observers_run_after_the_response_goes_on_and_in_chain_order() -> None:
    calls: list[tuple[str, str]] = []

    async def main() -> None:
        proxy = master.Master(options.Options(), with_termlog=False)
        proxy.addons = CachedHooks.replacing(proxy)
        proxy.addons.add(Observer("parse", calls, slow="response"), Tracer("credentials", calls),
                         Observer("record", calls, fail="response"), Observer("live", calls))
        flow = tflow.tflow(resp=True)
        try:
            await proxy.addons.trigger_event(http_hooks.HttpResponseHook(flow))
            calls.append(("proxy", "relays the response"))  # what mitmproxy does next, same step
            await proxy.addons.trigger_event(http_hooks.HttpRequestHook(flow))  # not deferred
            await asyncio.sleep(0.05)
        finally:
            proxy._legacy_log_events.uninstall()

    asyncio.run(main())
    assert calls == [
        ("credentials", "response"), ("proxy", "relays the response"),
        ("parse", "request"), ("credentials", "request"), ("record", "request"), ("live", "request"),
        ("parse", "response"), ("parse", "response awaited"), ("record", "response"),
        ("live", "response"),  # after a failing observer, the next one still runs
    ]


def test_accounting_still_under_way_finishes_before_the_addons_are_done() -> None:
    calls: list[tuple[str, str]] = []

    class Closing(Observer):
        def done(self) -> None:
            calls.append((self.name, "done"))

    async def main() -> None:
        proxy = master.Master(options.Options(), with_termlog=False)
        proxy.addons = CachedHooks.replacing(proxy)
        proxy.addons.add(Closing("record", calls, slow="response"))
        try:
            await proxy.addons.trigger_event(http_hooks.HttpResponseHook(tflow.tflow(resp=True)))
            await asyncio.sleep(0)  # the deferred observer starts, then waits on its await
            await proxy.addons.trigger_event(hooks.DoneHook())
        finally:
            proxy._legacy_log_events.uninstall()

    asyncio.run(main())
    assert calls == [("record", "response"), ("record", "response awaited"), ("record", "done")]
