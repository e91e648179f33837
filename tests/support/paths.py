"""Where the tests' shared files are, whichever folder a test module sits in."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
DOCS = REPO / "docs"
FIXTURES = TESTS / "fixtures"
STREAMS = FIXTURES / "streams"
CLIS = TESTS / "clis" / "node_modules"
