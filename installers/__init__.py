"""Service unit templates and packaging files, shipped as `llmtap.installers` package data."""
