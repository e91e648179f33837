"""macOS: pf redirect (pf.py, natlook.py), System keychain trust (trust.py), launchd (launchd.py).

Exercised on Linux CI only through tests/test_macos_*.py: golden pf rules and commands, saved
pfctl/launchctl outputs, the DIOCNATLOOK struct checked against xnu's pfvar.h, and a fake kernel
answering the ioctl. Not yet run against a real macOS pf.
"""
