"""Keyed pseudonyms: stable under one key, unrelated under another, never revealing the key."""

from __future__ import annotations

import datetime as dt
import pickle

import pytest

from foundation.privacy.pseudonym import (
    KEY_ENV,
    MissingKeyError,
    PseudonymKey,
    generate_key_file,
    load_key,
)

SECRET_A = b"a" * 32
SECRET_B = b"b" * 32


def test_same_identifier_same_pseudonym_and_other_key_differs():
    a1, a2, b = PseudonymKey(SECRET_A), PseudonymKey(SECRET_A), PseudonymKey(SECRET_B)
    assert a1.patient("IPP123") == a2.patient("IPP123")
    assert a1.patient("IPP123") != b.patient("IPP123")
    assert a1.patient("IPP123") != a1.patient("IPP124")
    # namespaces keep a study UID and a patient ID with the same text apart
    assert a1.pseudonym("study", "IPP123") != a1.patient("IPP123")


def test_key_never_printed_nor_pickled():
    key = PseudonymKey(SECRET_A)
    assert SECRET_A.decode() not in repr(key) and SECRET_A.decode() not in str(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_date_shift_keeps_intervals_and_is_nonzero():
    key = PseudonymKey(SECRET_A)
    d1, d2 = dt.date(2020, 1, 1), dt.date(2021, 3, 15)
    s1, s2 = key.shift_date("P1", d1), key.shift_date("P1", d2)
    assert (s2 - s1) == (d2 - d1)
    shifts = {key.date_shift_days(f"P{i}") for i in range(200)}
    assert 0 not in shifts and all(-365 <= s <= 365 for s in shifts) and len(shifts) > 50


def test_no_key_no_run(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingKeyError):
        load_key()
    with pytest.raises(MissingKeyError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(ValueError):
        PseudonymKey(b"short")


def test_key_file_and_env_give_same_key(monkeypatch, tmp_path):
    path = tmp_path / "k" / "key.txt"
    key = generate_key_file(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_key(path).key_id == key.key_id
    monkeypatch.setenv(KEY_ENV, path.read_text().strip())
    assert load_key().patient("X") == key.patient("X")
