"""macOS: pf redirect (pf.py, natlook.py), System keychain trust (trust.py), launchd (launchd.py),
the service account (users.py), the runtime environment for shells and GUI apps (environment.py)
and the JDKs' keystores (java.py). llmtap.install.macos assembles them into `llmtap install`.

Exercised on Linux only, through tests/unit/macos/: golden pf rules and commands, saved
pfctl/launchctl/security/dscl outputs, a fake macOS for the whole install lifecycle, the DIOCNATLOOK
struct checked against xnu's pfvar.h, and a fake kernel answering the ioctl. Not yet run on a Mac.
"""
