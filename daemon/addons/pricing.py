"""Cost of each exchange (`cost_usd`) from the shipped price table and the user's override.

The override is `<state_dir>/prices.json`, written by `llmtap prices import`; it is re-read when
it changes (checked at most every few seconds), so an import needs no restart. `cost_usd` is None,
never 0, for a model the table does not know (its record keeps the model name, and `price_row`
is None) or when the exchange reported no usage.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from llmtap.addons.recorder import fields
from llmtap.pricing import PriceTable, default_table, effective_table, override_path
from mitmproxy import ctx, http

log = logging.getLogger(__name__)

RECHECK_S = 2.0
default_table()  # read the shipped table now: the worker may not reach the package files later


class Pricing:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self) -> None:
        self.table: PriceTable = default_table()
        self.override: Path | None = None
        self._stamp: tuple[int, int] | None = None  # the override's (mtime_ns, size) last read
        self._checked = 0.0

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_state_dir" in updated:
            state_dir = ctx.options.llmtap_state_dir
            self.override = override_path(Path(state_dir)) if state_dir else None
            self._reload()

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
        if record.get("counted") is False:  # a retrieval, a poll, an upgrade: billed elsewhere
            record["cost_usd"] = 0.0
            return
        model, usage = record.get("model"), record.get("usage") or {}
        price = self.table.price(model)
        cost = self.table.cost(model, usage, batch=bool(record.get("batch_pricing")))
        record["cost_usd"] = None if cost is None else float(cost)
        record["price_row"] = price.name if price else None
        record["price_table"] = self.table.version

    def _reload(self) -> None:
        """Reads the override when it appeared, changed or went away; a bad one is ignored."""
        stamp = None
        if self.override is not None:
            try:
                stat = os.stat(self.override)
                stamp = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.table, _ = effective_table(self.override if stamp else None)
        except (OSError, ValueError) as exc:
            log.warning("price override %s ignored: %s", self.override, exc)
            self.table = default_table()
