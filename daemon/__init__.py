"""llmtap: see, secure and account for every LLM API call on this machine."""

__version__ = "0.1.0"
