"""Each pipeline addon alone, with mitmproxy's test helpers."""

from __future__ import annotations

import json
import re

import pytest
from llmtap import addons
from llmtap.addons.live import Live
from llmtap.addons.protocols import Protocols
from llmtap.addons.recorder import Recorder
from llmtap.addons.scope import NOTHING, Scope, allow_patterns
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow


def test_pipeline_follows_spec_order():
    names = [type(a).__name__.lower() for a in addons.pipeline()]
    assert names == [s for s in addons.PIPELINE if s in names]
    assert addons.PIPELINE[0] == "scope"
    # SPEC.md's stages end with live; only the stream tails, which wrap what they chose, follow.
    assert addons.PIPELINE[-1] == "streams"
    assert set(addons.STAGES) == set(addons.PIPELINE)


def test_scope_sets_anchored_allow_hosts():
    scope = Scope()
    with taddons.context(scope) as tctx:
        tctx.configure(scope, llmtap_targets=["API.openai.com", "api.anthropic.com"])
        patterns = tctx.options.allow_hosts
    assert patterns == allow_patterns(["api.openai.com", "api.anthropic.com"])
    matches = [h for h in ("api.openai.com:443", "api.openai.com.evil.example:443",
                           "xapi.openai.com:443", "10.0.0.2:443")
               if any(re.search(p, h, re.IGNORECASE) for p in patterns)]
    assert matches == ["api.openai.com:443"]


def test_scope_without_targets_decrypts_nothing():
    scope = Scope()
    with taddons.context(scope) as tctx:
        tctx.configure(scope, llmtap_targets=[])
        assert tctx.options.allow_hosts == [NOTHING]
        assert not re.search(NOTHING, "api.openai.com:443")


def test_scope_refuses_bad_targets():
    scope = Scope()
    with taddons.context(scope) as tctx, pytest.raises(exceptions.OptionsError, match="not a host"):
        tctx.configure(scope, llmtap_targets=["bad host"])


def test_protocols_streams_event_streams_only():
    protocols = Protocols()
    sse = tflow.tflow(resp=True)
    sse.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    plain = tflow.tflow(resp=True)  # a sized body: mitmproxy holds it (test_protocols_addon.py)
    with taddons.context(protocols):
        protocols.responseheaders(sse)
        protocols.responseheaders(plain)
    assert sse.response.stream is True and not plain.response.stream  # streamed: decided here,
    assert protocols.response_layer(sse) is not None  # its layer put in place by the streams stage


def test_recorder_writes_one_json_record_without_headers(tmp_path):
    recorder = Recorder()
    with taddons.context(recorder) as tctx:
        tctx.configure(recorder, llmtap_records_dir=str(tmp_path))
        flow = tflow.tflow(resp=True)
        flow.request.headers["authorization"] = "Bearer sk-secret-value"
        recorder.response(flow)
        recorder.done()
    [path] = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["id"] == flow.id and record["status"] == 200
    assert path.name.endswith(f"_unknown_{flow.id}.json")
    assert "sk-secret-value" not in path.read_text()


def test_recorder_refuses_unwritable_directory():
    recorder = Recorder()
    with taddons.context(recorder) as tctx, pytest.raises(exceptions.OptionsError):
        tctx.configure(recorder, llmtap_records_dir="/nonexistent/records")


def test_live_counts_connections_and_passthrough():
    live = Live()
    flow = tflow.tflow(resp=True)
    live.client_connected(flow.client_conn)
    live.client_connected(flow.client_conn)
    live.requestheaders(flow)
    live.response(flow)

    class Hello:
        ignore_connection = False

    live.tls_clienthello(Hello())  # type: ignore[arg-type]
    assert live.snapshot() == {"connections": 2, "intercepted": 1, "requests": 1,
                               "responses": 1, "errors": 0, "passthrough": 1}


def test_pipeline_hands_each_stage_what_it_depends_on():
    import socket

    from llmtap.addons.attribution import Attribution
    from llmtap.addons.credentials import Credentials
    from llmtap.addons.dlp import Dlp
    from llmtap.addons.filters import Filters
    from llmtap.addons.protocols import Protocols
    from llmtap.addons.streams import Streams

    ours, theirs = socket.socketpair()
    try:
        stages = addons.pipeline(lookup=ours)
        attribution = addons.stage(stages, Attribution)
        credentials, dlp = addons.stage(stages, Credentials), addons.stage(stages, Dlp)
        recorder, live = addons.stage(stages, Recorder), addons.stage(stages, Live)
        filters = addons.stage(stages, Filters)
        assert attribution is not None and attribution.channel is ours
        assert recorder is not None and recorder.lookup is attribution
        assert recorder.process_writer is None  # none given: it writes on a thread of its own
        assert live is not None and live.lookup is attribution
        assert credentials is not None and credentials.attribution is attribution
        assert dlp is not None and dlp.held is credentials
        assert filters is not None and filters.dlp_follows
        streams, protocols = addons.stage(stages, Streams), addons.stage(stages, Protocols)
        assert streams is not None
        assert streams.request_stages == (dlp, protocols)
        assert streams.response_stages == (credentials, live, recorder, protocols)
    finally:
        ours.close()
        theirs.close()


def test_live_asks_the_lookup_it_was_given_for_a_process_still_unknown():
    class Known:
        def process_of(self, flow):
            return {"pid": 9, "name": "node", "tool": "claude"}

        def pending(self, flow):
            return None

    live = Live(lookup=Known())
    flow = tflow.tflow(resp=True)
    assert live._process(flow) == {"pid": 9, "name": "node", "tool": "claude", "user": None}
