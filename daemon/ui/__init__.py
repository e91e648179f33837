"""`llmtap ui`: the local web UI (loopback only, a per-run token)."""
