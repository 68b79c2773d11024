"""Encryption of stored secrets (HF tokens): the key lives in a 0600 file outside the database."""

from __future__ import annotations

import os
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

    def seal(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def open(self, blob: bytes) -> str:
        return self._fernet.decrypt(blob).decode()
