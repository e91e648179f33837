"""The "budgets" stage: spending caps and rate limits (llmtap.budgets), enforced before a call
leaves.

It sits after protocols (the request is classified: provider, model, max tokens) and pricing (at
the response, the call's cost is known), before the recorder (which writes its `policy`). In
`request`, every budget and limit covering the call is checked:

- a rate limit with no room (rpm: calls admitted in the last 60 s; tpm: tokens of calls completed
  in the last 60 s) refuses it with a provider-shaped 429 `llmtap_rate_limited` and `retry-after`;
- a blocking budget the call could run over refuses it with a 429 `llmtap_budget_exceeded` naming
  the budget, its spend and how to raise it (`x-should-retry: false`: SDKs must not retry).
  "Could run over": spent + the estimates of the calls in flight + this call's estimate > cap.

An admitted call reserves its estimate (llmtap.spend.estimate) until its response or error, when the
real cost (the pricing stage's) takes its place; so parallel calls overshoot a cap by no more
than what their estimates missed. Alerts fire once per budget, period and threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llmtap.addons.budget_calls import Refused, covers, may_stream, ws_request
from llmtap.addons.replies import refusal
from llmtap.budgets import (
    Budget,
    Limit,
    Policy,
    load_policy,
    next_reset,
    periods,
    policy_path,
)
from llmtap.errors import UsageError
from llmtap.flow import BLOCKED_HEADER, BUDGETS_EARLY, ProcessLookup, fields
from llmtap.formatting import money
from llmtap.pricing import Pricer
from llmtap.spend import Ledger, Reservation, Windows, estimate, seconds, tokens_of
from mitmproxy import ctx, http

log = logging.getLogger(__name__)

RECHECK_S = 2.0  # how often budgets.json is looked at (a stat)
ATTRIBUTION_WAIT_S = 1.0  # a process or user selector waits this long for the process
STALE_S = 3600.0  # a reservation whose flow never ended is dropped after this
Events = Callable[[dict[str, Any]], None]


class Budgets:
    observes_response = True  # settles after pricing, off the client's path

    def __init__(self, pricer: Callable[[], Pricer] | None = None,
                 request_info: Callable[[http.HTTPFlow], Any] | None = None,
                 lookup: ProcessLookup | None = None, events: Events | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.pricer = pricer  # the pricing stage's current prices
        self.request_info = request_info  # the protocols stage's reading of the request
        self.lookup = lookup
        self.events = events  # the live feed
        self.clock = clock
        self.policy = Policy()
        self.ledger = Ledger()
        self.windows = Windows()
        self.reserved: dict[str, Reservation] = {}
        self._flying: dict[str, float] = {}  # per budget name: the reserved estimates' sum
        self._swept = 0.0
        self.fired: set[tuple[str, str, float]] = set()  # (budget, period, threshold)
        self.path: Path | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")
        loader.add_option("llmtap_records_dir", str, "", "Directory for the exchange records.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_state_dir" in updated:
            state_dir = ctx.options.llmtap_state_dir
            self.path = policy_path(Path(state_dir)) if state_dir else None
            self._stamp, self._checked = None, float("-inf")
            self.refresh()
        if "llmtap_records_dir" in updated and ctx.options.llmtap_records_dir:
            read = self.ledger.load_index(Path(ctx.options.llmtap_records_dir), self.clock())
            self.prime()
            log.debug("budgets: %d spend sums loaded", read)

    # -- the policy file -------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-reads budgets.json when it changed (a stat, at most every RECHECK_S)."""
        now = time.monotonic()
        if self.path is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.use(load_policy(self.path.parent))
        except UsageError as exc:
            log.warning("budgets: %s (the previous budgets and limits stay in force)", exc)

    def use(self, policy: Policy) -> None:
        self.policy = policy
        self.ledger.forget()
        self.windows.keep(policy.limits)
        log.info("budgets: %d budget(s), %d limit(s)", len(policy.budgets), len(policy.limits))

    def prime(self) -> None:
        """Thresholds already crossed (spend loaded at start) do not fire again."""
        now = self.clock()
        for budget in self.policy.budgets:
            for period, _spent, _cap, threshold in self._crossed(budget, now):
                self.fired.add((budget.name, period, threshold))

    # -- request: admit or refuse ------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """A body mitmproxy may stream (too large to hold, or of no stated length) goes upstream
        before `request` runs: that call is admitted or refused here, on its headers, its model
        not yet known (a budget or limit on any model covers it)."""
        if flow.response is not None or not may_stream(flow.request):
            return None
        flow.metadata[BUDGETS_EARLY] = True
        return self.request(flow, early=True)

    def request(self, flow: http.HTTPFlow, early: bool = False) -> Awaitable[None] | None:
        self.refresh()
        if flow.response is not None or not (self.policy.budgets or self.policy.limits):
            return None
        if flow.metadata.get(BUDGETS_EARLY) and not early:
            return None  # decided at its headers
        pending = self.lookup.pending(flow) if self.lookup else None
        if pending is not None and self._needs_process():
            return self._admit_after(flow, pending, early)
        self._admit(flow, early)
        return None

    def _needs_process(self) -> bool:
        return any(rule.where.needs_process() for rule in self.policy.budgets) or any(
            rule.where.needs_process() for rule in self.policy.limits)

    async def _admit_after(self, flow: http.HTTPFlow, pending: asyncio.Future[Any],
                           early: bool) -> None:
        with contextlib.suppress(TimeoutError):  # unknown in time: process selectors miss it
            await asyncio.wait_for(asyncio.shield(pending), ATTRIBUTION_WAIT_S)
        self._admit(flow, early)

    def _call(self, flow: http.HTTPFlow) -> dict[str, Any]:
        known = fields(flow)
        info = self.request_info(flow) if self.request_info else None
        process = known.get("process") or (self.lookup.process_of(flow) if self.lookup else None)
        return {"credential": known.get("credential"), "process": process,
                "model": known.get("model") or getattr(info, "model", None)}

    def _admit(self, flow: http.HTTPFlow, early: bool = False) -> None:
        call, now = self._call(flow), self.clock()
        budgets = tuple(b for b in self.policy.budgets if covers(b.where, call, early))
        limits = tuple(lim for lim in self.policy.limits if covers(lim.where, call, early))
        if not budgets and not limits:
            return
        policy: dict[str, Any] = {"budgets": [b.name for b in budgets],
                                  "limits": [lim.name for lim in limits]}
        fields(flow)["policy"] = policy
        cost = self._estimate(flow) if budgets else 0.0
        if (refused := self._verdict(budgets, limits, now, cost)) is not None:
            info = self.request_info(flow) if self.request_info else None
            flow.request.stream = False  # a response and a streamed request cannot go together
            flow.response = refusal(getattr(info, "provider", None), 429, refused.message,
                                    refused.code, "budgets", refused.headers)
            fields(flow)["error"] = refused.message
            policy |= refused.decision
            return
        self._reserve(flow.id, Reservation(budgets, limits, cost, call["model"],
                                           periods(now)[0], now))
        policy |= {"decision": "admitted", "estimate_usd": round(cost, 6)}

    def _verdict(self, budgets: tuple[Budget, ...], limits: tuple[Limit, ...], now: float,
                 cost: float) -> Refused | None:
        """Why the call may not go (a limit first, then a blocking budget); None admits it and
        takes its place in the limits' windows."""
        for lim in limits:
            if (wait := self.windows.retry_after(lim, now)) > 0:
                return self._rate_limited(lim, wait)
        for budget in budgets:
            if budget.action == "block" and (over := self._over(budget, now, cost)):
                return self._over_budget(budget, over, cost)
        for lim in limits:
            self.windows.admit(lim, now)
        return None

    def _estimate(self, flow: http.HTTPFlow) -> float:
        if self.pricer is None:
            return 0.0
        info = self.request_info(flow) if self.request_info else None
        request = flow.request
        size = len(request.raw_content or b"") or int(request.headers.get("content-length", "0") or 0)
        return estimate(self.pricer(), info, size, request.pretty_host, request.path)

    def in_flight(self, budget: Budget, now: float) -> float:
        if now - self._swept > STALE_S / 60:
            self._swept = now
            for flow_id in [i for i, r in self.reserved.items() if now - r.started > STALE_S]:
                self._release(flow_id)
        return max(0.0, self._flying.get(budget.name, 0.0))

    def _reserve(self, flow_id: str, reservation: Reservation) -> None:
        self.reserved[flow_id] = reservation
        for budget in reservation.budgets:
            self._flying[budget.name] = self._flying.get(budget.name, 0.0) + reservation.estimate

    def _release(self, flow_id: str) -> Reservation | None:
        reservation = self.reserved.pop(flow_id, None)
        if reservation is None:
            return None
        for budget in reservation.budgets:
            left = self._flying.get(budget.name, 0.0) - reservation.estimate
            if left > 1e-12:
                self._flying[budget.name] = left
            else:
                self._flying.pop(budget.name, None)
        return reservation

    def _over(self, budget: Budget, now: float, cost: float) -> tuple[str, float, float] | None:
        """(period, spent, cap) of the first cap the call could run over."""
        today, month = self.ledger.spent(budget, now)
        flying = self.in_flight(budget, now)
        for period, spent, cap in (("today", today, budget.daily), ("this month", month, budget.monthly)):
            if cap is not None and spent + flying + cost > cap:
                return period, spent + flying, cap
        return None

    def _over_budget(self, budget: Budget, over: tuple[str, float, float], cost: float) -> Refused:
        period, spent, cap = over
        flag = "--daily" if period == "today" else "--monthly"
        reset = next_reset(self.clock(), monthly=period != "today")
        message = (f"llmtap: budget {budget.name!r} ({budget.where.describe()}) has "
                   f"{money(spent)} of {money(cap)} spent or in flight {period}; this call could "
                   f"cost up to {money(cost)}. Raise it with `sudo llmtap budget set {budget.name} "
                   f"{flag} <USD>`, or wait for the reset at "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(reset))}.")
        log.warning("%s", message)
        headers = {"retry-after": str(seconds(reset - self.clock())), "x-should-retry": "false"}
        return Refused(message, "llmtap_budget_exceeded", headers,
                       {"decision": "blocked", "budget": budget.name})

    def _rate_limited(self, lim: Limit, wait: float) -> Refused:
        rates = ", ".join(f"{n} {v}" for n, v in (("rpm", lim.rpm), ("tpm", lim.tpm)) if v)
        message = (f"llmtap: rate limit {lim.name!r} ({lim.where.describe()}; {rates}) reached; "
                   f"retry in {seconds(wait)} s, or raise it with `sudo llmtap limit set "
                   f"{lim.name} --rpm <N>`.")
        log.warning("%s", message)
        return Refused(message, "llmtap_rate_limited", {"retry-after": str(seconds(wait))},
                       {"decision": "rate_limited", "limit": lim.name})

    # -- a Responses WebSocket: each response.create on it is a call ----------------------------

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """The upgrade was checked as a request; each response asked for on the connection is
        checked here. A refused one is not sent on: the client gets an `error` event instead
        (which also ends the exchange the protocols stage opened for it)."""
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if not message.from_client or message.injected:  # a binary frame is a call all the same
            return
        content = message.content
        # A cheap look first (audio appends are large); a JSON escape can spell the type too.
        if not (self.policy.budgets or self.policy.limits) or (
                b"response.create" not in content and b"\\u" not in content):
            return
        asked = ws_request(message.content)
        if asked is None:
            return
        call, now = self._call(flow), self.clock()
        call["model"] = asked.model
        budgets = tuple(b for b in self.policy.budgets if b.where.matches(call))
        limits = tuple(lim for lim in self.policy.limits if lim.where.matches(call))
        cost = 0.0
        if budgets and self.pricer is not None:
            cost = estimate(self.pricer(), asked, len(message.content), flow.request.pretty_host,
                            flow.request.path)
        if (refused := self._verdict(budgets, limits, now, cost)) is None:
            return
        message.drop()
        event = {"type": "error", "status": 429, "error": {
            "type": "rate_limit_error", "code": refused.code, "message": refused.message,
            "param": None}}
        ctx.master.commands.call("inject.websocket", flow, True, json.dumps(event).encode(), True)

    # -- response: settle ----------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self.settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.settle(flow)

    def settle(self, flow: http.HTTPFlow) -> None:
        """The reservation gives way to the real cost (a WebSocket exchange was never reserved:
        its cost is counted all the same)."""
        reservation = self._release(flow.id)
        record, now = fields(flow), self.clock()
        if reservation is None and (flow.response is None or BLOCKED_HEADER in flow.response.headers):
            return  # refused here or by an earlier stage: it cost nothing
        call = {"credential": record.get("credential"), "model": record.get("model"),
                "process": record.get("process"),
                "requested_model": reservation.model if reservation else None}
        day = reservation.day if reservation else periods(flow.request.timestamp_start or now)[0]
        budgets = tuple(b for b in self.policy.budgets if b.where.matches(call))
        cost = record.get("cost_usd")
        if record.get("counted") is not False and isinstance(cost, float | int) and cost > 0:
            self.ledger.add(day, call, float(cost))
        for lim in (reservation.limits if reservation else ()):
            self.windows.completed(lim, now, tokens_of(record.get("usage")))
        for budget in budgets:
            self._alerts(budget, now)

    # -- alerts --------------------------------------------------------------------------------

    def _crossed(self, budget: Budget, now: float) -> list[tuple[str, float, float, float]]:
        """(period key, spent, cap, threshold) of each threshold the spend has reached."""
        today, month = self.ledger.spent(budget, now)
        day_key, month_key = periods(now)
        found = []
        for key, spent, cap in ((day_key, today, budget.daily), (month_key, month, budget.monthly)):
            for threshold in sorted({budget.alert_at, 100.0}):
                if cap is not None and spent >= cap * threshold / 100:
                    found.append((key, spent, cap, threshold))
        return found

    def _alerts(self, budget: Budget, now: float) -> None:
        current = periods(now)
        self.fired = {f for f in self.fired if f[1] in current}  # past periods: forgotten
        for period, spent, cap, threshold in self._crossed(budget, now):
            if (budget.name, period, threshold) in self.fired:
                continue
            self.fired.add((budget.name, period, threshold))
            which = "daily" if len(period) == 10 else "monthly"
            message = (f"llmtap: budget {budget.name!r} at {spent / cap:.0%} of its {which} "
                       f"{money(cap)} ({money(spent)} spent; action {budget.action})")
            log.warning("%s", message)
            if self.events is not None:
                self.events({"type": "alert", "kind": "budget", "budget": budget.name,
                             "period": period, "threshold": threshold, "spent_usd": round(spent, 6),
                             "cap_usd": cap, "action": budget.action, "ts": now,
                             "message": message})

    # -- for status and the dashboard -------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        self.refresh()  # a change shows in `status` without waiting for a request
        now, shown = self.clock(), []
        for budget in self.policy.budgets:
            today, month = self.ledger.spent(budget, now)
            shown.append({"kind": "budget", "name": budget.name, "daily": budget.daily,
                          "monthly": budget.monthly, "action": budget.action,
                          "alert_at": budget.alert_at, "where": budget.where.describe(),
                          "spent_today": round(today, 6), "spent_month": round(month, 6),
                          "in_flight": round(self.in_flight(budget, now), 6)})
        for lim in self.policy.limits:
            calls, tokens = self.windows.use(lim, now)
            shown.append({"kind": "limit", "name": lim.name, "rpm": lim.rpm, "tpm": lim.tpm,
                          "where": lim.where.describe(), "calls_last_minute": calls,
                          "tokens_last_minute": tokens})
        return shown
