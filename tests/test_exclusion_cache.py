"""The exclusion list's binary sidecar: used only while it describes the JSON on disk, ignored
(and rebuilt) when stale or damaged, and a loaded list is the same whichever way it was read."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import foundation.privacy.exclusion as exclusion_mod
import foundation.privacy.exclusion_cache as cache_mod
from foundation.privacy.exclusion import ExclusionEntry, ExclusionError, ExclusionList
from foundation.privacy.exclusion_cache import read_sidecar, sidecar_path
from foundation.privacy.pseudonym import PseudonymKey

KEY = PseudonymKey(b"exclusion-cache-test-key-0123456789")


def _list(n: int, start: int = 0, key_id: str | None = "kid") -> ExclusionList:
    types = ("opposition", "erasure")
    entries = [
        ExclusionEntry(f"{i:024x}", types[i % 3 == 0], f"2024-01-{1 + i % 28:02d}")
        for i in range(start, start + n)
    ]
    entries.append(ExclusionEntry(f"{start:024x}", "opposition", "2024-02-01"))  # both types
    return ExclusionList(entries, key_id=key_id)


def _same(a: ExclusionList, b: ExclusionList) -> None:
    assert a.version == b.version and a.key_id == b.key_id
    assert a.pseudonyms == b.pseudonyms and a.counts == b.counts and len(a) == len(b)
    assert a.entries == b.entries
    assert a.pseudonyms_for("erasure") == b.pseudonyms_for("erasure")


def _no_json_parse(monkeypatch) -> None:
    def refuse(entries):
        raise AssertionError("the JSON was parsed")

    monkeypatch.setattr(exclusion_mod, "_rows_from_json", refuse)


def test_save_writes_a_sidecar_that_load_uses(tmp_path, monkeypatch):
    lst = _list(200)
    path = tmp_path / "excl.json"
    lst.save(path)
    assert sidecar_path(path).is_file()
    from_json = ExclusionList.load(path, cache=False)
    with monkeypatch.context() as mp:
        _no_json_parse(mp)
        from_cache = ExclusionList.load(path)
    _same(from_cache, lst)
    _same(from_json, lst)
    # the JSON is still the contract: pseudonyms, types, dates, version; nothing else added
    data = json.loads(path.read_text())
    assert data["version"] == lst.version and len(data["entries"]) == 201
    assert set(data["entries"][0]) == {"pseudonym", "request_type", "date_received"}


def test_stale_sidecar_is_ignored_and_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "excl.json"
    _list(50).save(path)
    old_cache = tmp_path / "old.cache"
    shutil.copy(sidecar_path(path), old_cache)
    new = _list(60, start=1000)
    new.save(path)
    shutil.copy(old_cache, sidecar_path(path))  # the sidecar of the previous list
    _same(ExclusionList.load(path), new)
    with monkeypatch.context() as mp:  # rebuilt: the next load reads it
        _no_json_parse(mp)
        _same(ExclusionList.load(path), new)

    # a sidecar whose recorded file state matches but whose version is another list's
    data = old_cache.read_bytes()
    end = data.index(b"\n")
    head = json.loads(data[:end])
    head["source"] = cache_mod.stamp(os.stat(path))
    sidecar_path(path).write_bytes(json.dumps(head).encode() + data[end:])
    assert read_sidecar(path) is None
    _same(ExclusionList.load(path), new)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_sidecar_is_ignored_and_rebuilt(tmp_path, damage):
    lst = _list(80)
    path = tmp_path / "excl.json"
    lst.save(path)
    cache = sidecar_path(path)
    data = bytearray(cache.read_bytes())
    if damage == "flip":
        data[-20] ^= 0x01  # a pseudonym's character changes: the body no longer hashes right
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00\xff not a cache\n" * 3)
    else:
        data = bytearray()
    cache.write_bytes(bytes(data))
    assert read_sidecar(path) is None
    _same(ExclusionList.load(path), lst)
    assert read_sidecar(path) is not None  # rewritten by the load


def test_edited_json_is_refused_even_with_a_sidecar(tmp_path):
    path = tmp_path / "excl.json"
    _list(20).save(path)
    data = json.loads(path.read_text())
    data["entries"][3]["date_received"] = "2024-01-09"  # same size, version not updated
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    with pytest.raises(ExclusionError, match="version"):
        ExclusionList.load(path)


def test_unwritable_sidecar_only_costs_a_parse(tmp_path):
    lst = _list(30)
    path = tmp_path / "excl.json"
    sidecar_path(path).mkdir()  # the sidecar cannot be written there (nor read)
    lst.save(path)
    _same(ExclusionList.load(path), lst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["excl.json", "excl.json.cache"]


def test_version_is_the_canonical_json_hash(tmp_path):
    """The directly written canonical form equals json.dumps' (the version of existing lists
    must not change), odd characters included."""
    import hashlib

    entries = [
        ExclusionEntry('ab"c\\d', "erasure", "2024-01-01"),
        ExclusionEntry("é\u2028x", "opposition", "2024-01-02"),
        ExclusionEntry("0" * 64, "opposition", "2024-01-03"),
    ]
    for key_id in (None, "k\u00e9y"):
        lst = ExclusionList(entries, key_id=key_id)
        body = {"key_id": key_id, "entries": [e.__dict__ for e in sorted(entries)]}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert lst.version == hashlib.sha256(canonical).hexdigest()[:16]
        lst.save(tmp_path / "odd.json")
        _same(ExclusionList.load(tmp_path / "odd.json"), lst)
        _same(ExclusionList.load(tmp_path / "odd.json", cache=False), lst)


def test_a_loaded_list_still_imports_and_changes_version(tmp_path):
    path = tmp_path / "excl.json"
    ExclusionList(key_id=KEY.key_id).save(path)
    csv = tmp_path / "req.csv"
    csv.write_text("patient_id,request_type,date_received\nIPP1,erasure,2024-03-01\n")
    lst = ExclusionList.load(path)
    before = lst.version
    assert lst.import_requests(csv, KEY).added == 1
    assert lst.version != before and KEY.patient("IPP1") in lst
    assert lst.pseudonyms_for("erasure") == {KEY.patient("IPP1")}
    lst.save(path)
    _same(ExclusionList.load(path), lst)
    _same(ExclusionList.load(path, cache=False), lst)
