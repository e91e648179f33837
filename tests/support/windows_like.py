"""Code for a child Python that must act as if on Windows: the POSIX-only modules refuse to be
imported by llmtap (the rest of the interpreter, pytest's included, keeps them)."""

BLOCK_POSIX_IMPORTS = r'''
import builtins
POSIX_ONLY = {"pwd", "grp", "fcntl", "termios", "resource", "pty"}
real_import = builtins.__import__

def no_posix(name, globals=None, locals=None, fromlist=(), level=0):
    if name.split(".")[0] in POSIX_ONLY and (globals or {}).get("__name__", "").startswith("llmtap"):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = no_posix
'''
