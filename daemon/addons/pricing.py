"""Cost of each exchange (`cost_usd`) and where its price came from (`price`).

Prices come from llmtap.pricing: the user's override (`<state_dir>/prices.json`, from `llmtap
prices import`), then the genai-prices data `llmtap prices update` stored
(`<state_dir>/genai-prices.json`), then the snapshot bundled with genai-prices. The files are
re-read when they change (checked at most every few seconds), so neither needs a restart. With
`prices.update_hours` set, this addon fetches the data that often itself.

`cost_usd` is None, never 0, for a model no source knows (its record keeps the model name and
`price` is None) or when the exchange reported no usage. An exchange that is not a billed call
(`counted: false`: a retrieval, a poll, a WebSocket upgrade) costs 0.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from pathlib import Path

from llmtap import price_data
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.flow import Record, fields
from llmtap.price_override import override_path
from llmtap.pricing import Call, Pricer, load_pricer
from mitmproxy import ctx, http

log = logging.getLogger(__name__)

RECHECK_S = 2.0
# Read the bundled data and price one call now: genai-prices imports modules on first use, and the
# worker may not reach the interpreter's files once it has dropped its privileges.
Pricer([price_data.bundled()]).quote(Call("claude-sonnet-4-5", {"input_tokens": 1}, "api.anthropic.com"))

Stamp = tuple[int, int] | None  # a file's (mtime_ns, size); None when absent


class Pricing:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self) -> None:
        self.pricer = Pricer([price_data.bundled()])
        self.state_dir: Path | None = None
        self.update_hours = 0.0
        self.update_url = price_data.UPDATE_URL
        self._stamps: tuple[Stamp, Stamp] = (None, None)
        self._checked = 0.0
        self._updater: asyncio.Task[None] | None = None

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")
        loader.add_option("llmtap_config_file", str, "", "llmtap's TOML config file.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_state_dir" in updated:
            state_dir = ctx.options.llmtap_state_dir
            self.state_dir = Path(state_dir) if state_dir else None
            self._stamps = (None, None)
            self._reload()
        if "llmtap_config_file" in updated and ctx.options.llmtap_config_file:
            try:
                prices = load_config(ctx.options.llmtap_config_file).prices
            except UsageError:
                return  # the supervisor validated it; a config changed since is read at restart
            self.update_hours, self.update_url = prices.update_hours, prices.url

    def running(self) -> None:
        if self.update_hours > 0 and self.state_dir is not None and self._updater is None:
            self._updater = asyncio.get_running_loop().create_task(self._update_forever())

    def done(self) -> None:
        if self._updater is not None:
            self._updater.cancel()

    def response(self, flow: http.HTTPFlow) -> None:
        self._price(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._price(flow)

    def _price(self, flow: http.HTTPFlow) -> None:
        now = time.monotonic()
        if now - self._checked > RECHECK_S:
            self._checked = now
            self._reload()
        record = fields(flow)
        if record.get("counted") is False:  # not a billed call: its cost is counted elsewhere
            record["cost_usd"], record["price"] = 0.0, None
            return
        quote = self.pricer.quote(call_of(record, flow))
        record["cost_usd"] = None if quote.cost is None else float(quote.cost)
        record["price"] = quote.provenance

    def _reload(self) -> None:
        """Rebuilds the pricer when a price file appeared, changed or went away; a bad one is
        skipped with a warning and the others still price."""
        override_file = override_path(self.state_dir) if self.state_dir else None
        fetched_file = price_data.fetched_path(self.state_dir) if self.state_dir else None
        stamps = (_stamp(override_file), _stamp(fetched_file))
        if stamps == self._stamps:
            return
        self._stamps = stamps
        self.pricer, problems = load_pricer(self.state_dir)
        for problem in problems:
            log.warning("%s", problem)

    async def _update_forever(self) -> None:
        assert self.state_dir is not None
        while True:
            try:
                data = await asyncio.to_thread(price_data.update, self.update_url, self.state_dir)
                log.info("prices updated: genai-prices %s (%d models)", data.version, data.models)
            except (OSError, ValueError) as exc:
                log.warning("prices update from %s failed: %s", self.update_url, exc)
            await asyncio.sleep(self.update_hours * 3600)


def call_of(record: Record, flow: http.HTTPFlow) -> Call:
    started = flow.request.timestamp_start
    return Call(
        model=record.get("model"),
        usage=record.get("usage") or {},
        host=str(record.get("host") or flow.request.pretty_host),
        path=str(record.get("path") or flow.request.path),
        provider=record.get("provider"),
        batch=bool(record.get("batch_pricing")),
        service_tier=record.get("service_tier"),
        speed=record.get("speed"),
        web_searches=int(record.get("web_search_requests") or 0),
        at=datetime.datetime.fromtimestamp(started, datetime.UTC) if started else None,
    )


def _stamp(path: Path | None) -> Stamp:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
