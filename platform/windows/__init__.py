"""Windows: WinDivert redirect (windivert.py), Root store trust (trust.py), service (service.py),
directories for Administrators only (acl.py), machine-wide variables (environment.py); `llmtap run`
itself is inprocess.py, and `llmtap install` llmtap.install.windows.

Exercised on Linux CI only through tests/unit/windows/: real IPv4/IPv6 packet bytes through a
fake pydivert, golden filters, the task XML and a fake pywin32. Not yet run on a real Windows.
"""
