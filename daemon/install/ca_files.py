"""The CA's own files during `llmtap ca rotate`, the same on every OS: the old pair kept to put
back on failure, the new one written, the old certificate saved for untrusting it."""

from __future__ import annotations

from pathlib import Path

from llmtap import ca
from llmtap.ca import write_file
from llmtap.config import Config


class CaFiles:
    def __init__(self, config: Config, old_cert_file: Path, owner: tuple[int, int]) -> None:
        self.hosts = config.targets.all_hosts
        self.key_file = config.ca_dir / ca.KEY_AND_CERT
        self.cert_file = ca.public_cert_path(config.ca_dir)
        self.old_cert_file = old_cert_file
        self.uid, self.gid = owner
        self.old = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        self.new = ca.create_ca(self.hosts)

    def write(self, key_file: bytes, cert: bytes) -> None:
        write_file(self.key_file, key_file, 0o600, self.uid, self.gid)
        write_file(self.cert_file, cert, 0o644, self.uid, self.gid)

    def restore_old(self) -> None:
        self.write(*self.old)

    def write_new(self) -> str:
        key, cert = self.new
        self.write(key + cert, cert)
        return f"issued a new CA, name-constrained to {len(self.hosts)} target domains"

    def old_cert(self) -> Path:
        write_file(self.old_cert_file, self.old[1], 0o644)
        return self.old_cert_file
