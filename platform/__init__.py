"""Per-OS code, importable only as `llmtap.platform` (see pyproject's package-dir)."""

if __name__ == "platform":
    # The checkout's root is on sys.path (e.g. `python -m ...` run from it) and this directory
    # shadowed the standard library's `platform`: hand the importer the real one instead.
    import importlib.util
    import sys
    import sysconfig
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location(
        "platform", Path(sysconfig.get_path("stdlib")) / "platform.py"
    )
    assert _spec is not None and _spec.loader is not None
    _stdlib = importlib.util.module_from_spec(_spec)
    sys.modules["platform"] = _stdlib
    _spec.loader.exec_module(_stdlib)
