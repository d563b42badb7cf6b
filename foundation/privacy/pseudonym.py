"""Keyed pseudonyms (HMAC-SHA256) and per-patient date shifts.

The secret key never leaves this module in clear: ``PseudonymKey`` hides it from ``repr``,
``str``, pickling and logs, and only its fingerprint (``key_id``) may be recorded in manifests
and checkpoints. The same identifier under the same key always gives the same pseudonym, in
every run and every ingest partition; another key gives unrelated pseudonyms.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "FOUNDATION_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
PSEUDONYM_HEX_CHARS = 24  # 96 bits: no collision in practice at hospital scale
MAX_DATE_SHIFT_DAYS = 365


class MissingKeyError(RuntimeError):
    """No pseudonymisation key was given: nothing may be ingested without one."""


class PseudonymKey:
    """A secret HMAC key. Its value is never printed, pickled or logged."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"pseudonymisation key too short: need at least {MIN_KEY_BYTES} bytes")
        self._secret = secret
        # Fingerprint: safe to record; says which key built a dataset without revealing it.
        self.key_id = hmac.new(secret, b"foundation:key-id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"PseudonymKey(key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self):  # refuse pickling: the key must not reach a checkpoint or a worker dump
        raise TypeError("PseudonymKey cannot be pickled")

    def digest(self, namespace: str, value: str) -> str:
        """Hex HMAC-SHA256 of ``namespace:value``."""
        msg = f"{namespace}:{value}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def pseudonym(self, namespace: str, value: str) -> str:
        """Stable pseudonym of an identifier within a namespace ("patient", "study", ...)."""
        value = str(value).strip()
        if not value:
            raise ValueError(f"empty identifier for namespace {namespace!r}")
        return self.digest(namespace, value)[:PSEUDONYM_HEX_CHARS]

    def patient(self, patient_id: str) -> str:
        """Pseudonym of a patient identifier (PatientID as the hospital knows it)."""
        return self.pseudonym("patient", patient_id)

    def date_shift_days(self, patient_id: str) -> int:
        """Per-patient date offset in days, in [-365, 365] and never 0, derived from the key."""
        n = int(self.digest("dateshift", str(patient_id).strip())[:8], 16)
        offset = n % (2 * MAX_DATE_SHIFT_DAYS) - MAX_DATE_SHIFT_DAYS  # [-365, 364]
        return offset + 1 if offset >= 0 else offset  # [-365, -1] or [1, 365]

    def shift_date(self, patient_id: str, date: dt.date) -> dt.date:
        """``date`` moved by the patient's offset: intervals between a patient's exams survive."""
        return date + dt.timedelta(days=self.date_shift_days(patient_id))


def load_key(key_file: str | os.PathLike | None = None) -> PseudonymKey:
    """Read the key from ``key_file`` or ``$FOUNDATION_PSEUDONYM_KEY``; no key, no run.

    Key files hold the secret as text (hex or any passphrase of at least 16 bytes); they should
    be readable by the data engineer only, outside the repository, configs and outputs.
    """
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise MissingKeyError(f"key file {path} does not exist")
        secret = path.read_text(encoding="utf-8").strip()
        if not secret:
            raise MissingKeyError(f"key file {path} is empty")
        return PseudonymKey(secret.encode())
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        return PseudonymKey(env.encode())
    raise MissingKeyError(
        f"no pseudonymisation key: set ${KEY_ENV} or pass --key-file (see README, 'Keys')"
    )


def generate_key_file(path: str | os.PathLike) -> PseudonymKey:
    """Write a fresh random key to ``path`` (mode 0600) and return it. For demos and tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    return PseudonymKey(secret.encode())
