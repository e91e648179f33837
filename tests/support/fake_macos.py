"""A fake macOS for the installer: a runner that keeps the state dscl, security, launchctl and
pfctl would change (answering in the formats of the saved outputs in fixtures/macos), and a
snapshot of that state plus a temporary root tree, to compare before and after.

The LaunchDaemon's `llmtap run` is modelled too: bootstrap loads the pf anchor and enables pf
by token (writing the token file, as PfBackend does); bootout undoes both, unless `crash` is set
(then they stay behind, as after a daemon killed with SIGKILL)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paths
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from llmtap.platform.runner import Completed

FIXTURES = paths.FIXTURES / "macos"
KEYCHAIN = "/Library/Keychains/System.keychain"
ANCHOR_RULES = (
    "rdr pass on lo0 inet proto tcp from any to <llmtap_targets4> port = 443 -> 127.0.0.1 port 8443\n")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sha1_of(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def listed(name: str) -> dict[str, dict[str, list[str]]]:
    kind = "Users" if "users" in name else "Groups"
    attribute = "UniqueID" if kind == "Users" else "PrimaryGroupID"
    return {f"/{kind}/{line.split()[0]}": {"RecordName": [line.split()[0]],
                                         attribute: [line.split()[1]]}
            for line in fixture(name).splitlines() if line.strip()}


class FakeMac:
    def __init__(self, root: Path, console_uid: int = 501) -> None:
        self.root = root
        self.state: dict[str, Any] = {
            "records": {**listed("dscl_list_users.txt"), **listed("dscl_list_groups.txt")},
            "keychain": {},  # sha1 -> pem
            "trusted": [],  # sha1s with an admin trust setting
            "jobs": {},  # label -> plist path (bootstrapped in the system domain)
            "gui_env": {},  # uid -> {name: value}
            "anchor": "",  # the rules in com.apple/llmtap
            "tokens": [],  # pf references held
            "next_token": 14574231651387265831,
            "keystores": {},  # JDK cacerts path -> {alias: pem}
        }
        self.console_uid = console_uid
        self.crash = False
        self.calls: list[list[str]] = []
        self.fail: Callable[[list[str]], bool] = lambda argv: False

    # --- the runner ---

    def __call__(self, argv: list[str], stdin: str | None = None) -> Completed:
        self.calls.append(argv)
        if self.fail(argv):
            return Completed(1, "", f"{Path(argv[0]).name}: injected failure")
        tool = Path(argv[0]).name
        handler = getattr(self, f"run_{tool}", None)
        if handler is None:
            return Completed(127, "", f"{argv[0]}: not found")
        result: Completed = handler(argv[1:], stdin)
        return result

    def run_sw_vers(self, args: list[str], stdin: str | None) -> Completed:
        return Completed(0, fixture("sw_vers.txt"))

    def run_stat(self, args: list[str], stdin: str | None) -> Completed:
        assert args == ["-f", "%u", "/dev/console"], args
        return Completed(0, f"{self.console_uid}\n")

    def run_dscl(self, args: list[str], stdin: str | None) -> Completed:
        assert args[0] == ".", args
        verb, record, rest = args[1], args[2], args[3:]
        records = self.state["records"]
        if verb == "-list":
            rows = [(r.split("/")[2], v[rest[0]][0]) for r, v in sorted(records.items())
                    if r.startswith(record + "/") and rest[0] in v]
            return Completed(0, "".join(f"{name:<32}{value}\n" for name, value in rows))
        if verb == "-read":
            if record not in records or rest[0] not in records[record]:
                return Completed(56, "", fixture("dscl_read_missing_stderr.txt"))
            return Completed(0, f"{rest[0]}: {' '.join(records[record][rest[0]])}\n")
        if verb == "-create":
            entry = records.setdefault(record, {"RecordName": [record.split("/")[2]]})
            if rest:
                entry[rest[0]] = rest[1:]
            return Completed(0)
        if verb == "-delete" and record in records:
            del records[record]
            return Completed(0)
        return Completed(56, "", fixture("dscl_read_missing_stderr.txt"))

    def run_security(self, args: list[str], stdin: str | None) -> Completed:
        keychain, trusted = self.state["keychain"], self.state["trusted"]
        verb = args[0]
        if verb == "add-trusted-cert":
            assert args[1:6] == ["-d", "-r", "trustRoot", "-k", KEYCHAIN], args
            pem = Path(args[6]).read_text()
            keychain[sha1_of(pem)] = pem
            trusted.append(sha1_of(pem)) if sha1_of(pem) not in trusted else None
            return Completed(0)
        if verb == "find-certificate":
            assert args[1:] == ["-a", "-c", "llmtap local CA", "-Z", "-p", KEYCHAIN], args
            out = "".join(f"SHA-256 hash: {'0' * 64}\nSHA-1 hash: {sha1}\n{pem}"
                          for sha1, pem in keychain.items())
            return Completed(0 if out else 44, out, "" if out else
                             "security: SecKeychainSearchCopyNext: The specified item could not "
                             "be found in the keychain.\n")
        if verb == "remove-trusted-cert":
            sha1 = sha1_of(Path(args[2]).read_text())
            if sha1 not in trusted:
                return Completed(1, "", "SecTrustSettingsRemoveTrustSettings: The specified "
                                 "item could not be found in the keychain.\n")
            trusted.remove(sha1)
            return Completed(0)
        if verb == "delete-certificate":
            assert args[1] == "-Z" and args[3] == KEYCHAIN, args
            if keychain.pop(args[2], None) is None:
                return Completed(1, "", "Unable to delete certificate matching \"" + args[2] + "\"")
            return Completed(0)
        if verb == "verify-cert":
            sha1 = sha1_of(Path(args[2]).read_text())
            return (Completed(0, fixture("security_verify_ok.txt")) if sha1 in trusted
                    else Completed(1, fixture("security_verify_untrusted.txt")))
        return Completed(1, "", f"security: unknown command {verb}")

    def run_launchctl(self, args: list[str], stdin: str | None) -> Completed:
        jobs = self.state["jobs"]
        verb = args[0]
        if verb == "asuser":
            assert args[2:5] == ["/usr/bin/sudo", "-u", f"#{args[1]}"], args
            assert Path(args[5]).name == "launchctl", args
            return self.gui_env(int(args[1]), args[6:])
        label = args[1].split("/", 1)[1] if "/" in args[1] else ""
        if verb == "print":
            if label not in jobs:
                return Completed(113, "", fixture("launchctl_print_missing_stderr.txt"))
            return Completed(0, fixture("launchctl_print_running.txt"))
        if verb == "bootstrap":
            plist = Path(args[2])
            assert args[1] == "system" and plist.is_file(), args
            label = plist.stem
            if label in jobs:
                return Completed(5, "", fixture("launchctl_bootstrap_failed_stderr.txt"))
            jobs[label] = str(plist)
            self.daemon_starts()
            return Completed(0)
        if verb == "bootout":
            if jobs.pop(label, None) is None:
                return Completed(3, "", "Boot-out failed: 3: No such process\n")
            if not self.crash:
                self.daemon_stops()
            return Completed(0)
        if verb == "kickstart":
            return Completed(0 if label in jobs else 113)
        return Completed(64, "", f"Unrecognized subcommand: {verb}")

    def run_keytool(self, args: list[str], stdin: str | None) -> Completed:
        """keytool with -keystore K -storepass changeit at the end, as JdkTrustStore runs it."""
        assert args[-4] == "-keystore" and args[-2:] == ["-storepass", "changeit"], args
        alias = args[args.index("-alias") + 1]
        store = self.state["keystores"].get(args[-3], {})
        if "-importcert" in args:
            self.state["keystores"][args[-3]] = store
            if alias in store:
                return Completed(1, "keytool error: java.lang.Exception: Certificate not "
                                 f"imported, alias <{alias}> already exists\n")
            store[alias] = Path(args[args.index("-file") + 1]).read_text()
            return Completed(0, "Certificate was added to keystore\n")
        if alias not in store:
            return Completed(1, f"keytool error: java.lang.Exception: Alias <{alias}> does not "
                             "exist\n")
        if "-delete" in args:
            del store[alias]
            if not store:
                del self.state["keystores"][args[-3]]
            return Completed(0)
        if "-exportcert" in args:
            return Completed(0, store[alias])
        return Completed(0, f"{alias}, 2 Dec 2026, trustedCertEntry,\n")

    def gui_env(self, uid: int, args: list[str]) -> Completed:
        env = self.state["gui_env"].setdefault(str(uid), {})
        if args[0] == "setenv":
            env[args[1]] = args[2]
        elif args[0] == "unsetenv":
            env.pop(args[1], None)
        elif args[0] == "getenv":
            return Completed(0, f"{env[args[1]]}\n" if args[1] in env else "")
        if not env:
            del self.state["gui_env"][str(uid)]
        return Completed(0)

    def run_pfctl(self, args: list[str], stdin: str | None) -> Completed:
        noise = fixture("pfctl_enable_stderr.txt").splitlines()[:2]
        stderr = "\n".join(noise) + "\n"
        if args[:2] == ["-a", "com.apple/llmtap"]:
            return self.anchor(args[2:], stdin, stderr)
        if args == ["-s", "rules"]:
            return Completed(0, fixture("pfctl_main_rules.txt"), stderr)
        if args == ["-s", "nat"]:
            return Completed(0, fixture("pfctl_main_nat.txt"), stderr)
        if args == ["-s", "info"]:
            name = "pfctl_info_enabled.txt" if self.state["tokens"] else "pfctl_info_disabled.txt"
            return Completed(0, fixture(name), stderr)
        if args == ["-E"]:
            return Completed(0, "", stderr + f"pf enabled\nToken : {self.take_token()}\n")
        if args[0] == "-X":
            if args[1] not in self.state["tokens"]:
                return Completed(1, "", stderr + "pfctl: DIOCSTOPREF: Invalid argument\n")
            self.state["tokens"].remove(args[1])
            return Completed(0, "", stderr + ("pf disabled\n" if not self.state["tokens"] else ""))
        return Completed(1, "", f"pfctl: unexpected {args}")

    def anchor(self, args: list[str], stdin: str | None, stderr: str) -> Completed:
        if args == ["-f", "-"]:
            self.state["anchor"] = stdin or ""
        elif args == ["-F", "all"]:
            self.state["anchor"] = ""
        elif args in (["-s", "nat"], ["-s", "rules"]):
            lines = [line for line in self.state["anchor"].splitlines()
                     if (line.startswith("rdr") == (args[1] == "nat")) and not line.startswith(
                         ("#", "table"))]
            return Completed(0, "".join(f"{line}\n" for line in lines), stderr)
        return Completed(0, "", stderr)

    def take_token(self) -> str:
        token = str(self.state["next_token"])
        self.state["next_token"] += 1
        self.state["tokens"].append(token)
        return token

    # --- the daemon the LaunchDaemon runs ---

    @property
    def token_file(self) -> Path:
        return self.root / "var/run/llmtap-pf.token"

    def daemon_starts(self) -> None:
        self.state["anchor"] = ANCHOR_RULES
        self.token_file.parent.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.take_token() + "\n")

    def daemon_stops(self) -> None:
        self.state["anchor"] = ""
        if self.token_file.exists():
            self.state["tokens"].remove(self.token_file.read_text().strip())
            self.token_file.unlink()

    # --- comparing ---

    def snapshot(self, *trees: Path) -> dict[str, Any]:
        """Every file and directory under `trees` (path, mode, owner, bytes) and the state."""
        files: dict[str, Any] = {}
        for tree in trees:
            for dirpath, dirnames, filenames in os.walk(tree):
                for name in [*dirnames, *filenames]:
                    path = Path(dirpath) / name
                    st = path.lstat()
                    data = path.read_bytes().hex() if path.is_file() else None
                    files[str(path)] = (st.st_mode, st.st_uid, st.st_gid, data)
        state = copy.deepcopy(self.state)
        state.pop("next_token")
        return {"files": files, "state": json.loads(json.dumps(state))}


def unquoted_exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export ([A-Z_]+)='([^']*)'$", text, re.MULTILINE))
