"""Encryption of stored secrets (HF tokens): the key lives in a 0600 file outside the database."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet


class SecretBox:
    def __init__(self, key_file: Path):
        key_file.parent.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        self._fernet = Fernet(key_file.read_bytes().strip())

    def internal_key(self, path: Path) -> str:
        """The platform's key for gateway -> replica calls, stored sealed (0600) so restarts keep it."""
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.seal("fsi-" + secrets.token_urlsafe(32)))
        return self.open(path.read_bytes())

    def seal(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def open(self, blob: bytes) -> str:
        return self._fernet.decrypt(blob).decode()
