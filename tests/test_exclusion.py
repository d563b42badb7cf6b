"""The exclusion list: pseudonyms only, versioned by content, idempotent imports."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from foundation.privacy.exclusion import ExclusionEntry, ExclusionError, ExclusionList
from foundation.privacy.pseudonym import PseudonymKey

KEY = PseudonymKey(b"exclusion-test-key-0123456789")
RAW_IDS = ["IPP8001234", "IPP8001235", "IPP8001236"]


def write_csv(path: Path, rows: list[str], header: str = "patient_id,request_type,date_received"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def requests_csv(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "requests.csv",
        [
            f"{RAW_IDS[0]},opposition,2024-03-01",
            f"{RAW_IDS[1]},erasure,2024-03-02",
            f"{RAW_IDS[2]},opposition,15/03/2024",
        ],
    )


def test_import_hashes_ids_into_pseudonyms(requests_csv: Path) -> None:
    excl = ExclusionList()
    report = excl.import_requests(requests_csv, KEY)
    assert (report.rows, report.added, report.already_present, report.bad_rows) == (3, 3, 0, [])
    assert excl.pseudonyms == frozenset(KEY.patient(i) for i in RAW_IDS)
    assert KEY.patient(RAW_IDS[1]) in excl and RAW_IDS[1] not in excl
    assert excl.counts == {"opposition": 2, "erasure": 1}
    assert excl.pseudonyms_for("erasure") == {KEY.patient(RAW_IDS[1])}
    dates = {e.pseudonym: e.date_received for e in excl.entries}
    assert dates[KEY.patient(RAW_IDS[2])] == "2024-03-15"
    assert excl.key_id == KEY.key_id


def test_saved_file_holds_no_raw_id_and_round_trips(requests_csv: Path, tmp_path: Path) -> None:
    excl = ExclusionList()
    excl.import_requests(requests_csv, KEY)
    out = tmp_path / "lists" / "exclusion.json"
    excl.save(out)
    raw = out.read_bytes()
    for pid in RAW_IDS:
        assert pid.encode() not in raw and pid.lower().encode() not in raw
        assert pid not in repr(excl)
    assert KEY.patient(RAW_IDS[0]).encode() in raw
    back = ExclusionList.load(out)
    assert back.entries == excl.entries and back.version == excl.version
    assert json.loads(raw)["version"] == excl.version
    # no temp file left; the binary sidecar (a fast copy for loading) holds no raw ID either
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "exclusion.json",
        "exclusion.json.cache",
    ]
    cache = (out.parent / "exclusion.json.cache").read_bytes()
    assert all(pid.encode() not in cache and pid.lower().encode() not in cache for pid in RAW_IDS)


def test_version_tracks_content(requests_csv: Path, tmp_path: Path) -> None:
    a, b = ExclusionList(), ExclusionList()
    empty_version = a.version
    a.import_requests(requests_csv, KEY)
    b.import_requests(requests_csv, KEY)
    assert a.version == b.version != empty_version
    assert len(a.version) == 16 and int(a.version, 16) >= 0
    before = a.version
    more = write_csv(tmp_path / "more.csv", ["IPP9999999,erasure,2024-04-01"])
    a.import_requests(more, KEY)
    assert a.version != before
    # same content built in another order: same version
    c = ExclusionList(reversed(a.entries), key_id=a.key_id)
    assert c.version == a.version


def test_reimport_is_idempotent(requests_csv: Path) -> None:
    excl = ExclusionList()
    excl.import_requests(requests_csv, KEY)
    version = excl.version
    report = excl.import_requests(requests_csv, KEY)
    assert (report.added, report.already_present) == (0, 3)
    assert excl.version == version and len(excl) == 3
    # a new request type for a known patient is a new entry
    excl2 = ExclusionList(excl.entries, key_id=excl.key_id)
    later = requests_csv.with_name("later.csv")
    write_csv(later, [f"{RAW_IDS[0]},erasure,2024-05-01"])
    assert excl2.import_requests(later, KEY).added == 1
    assert len(excl2) == 3 and excl2.counts == {"opposition": 2, "erasure": 2}


def test_bad_rows_reported_by_line_without_raw_ids(tmp_path: Path) -> None:
    future = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    csv_path = write_csv(
        tmp_path / "bad.csv",
        [
            "IPP1000001,opposition,2024-01-02",  # line 2: fine
            ",erasure,2024-01-02",  # line 3: empty id
            "IPP1000003,forget-me,2024-01-02",  # line 4: unknown type
            "IPP1000004,erasure,someday",  # line 5: bad date
            f"IPP1000005,erasure,{future}",  # line 6: future date
            "IPP1000006,Effacement,2024-01-02",  # line 7: French alias, fine
        ],
    )
    excl = ExclusionList()
    report = excl.import_requests(csv_path, KEY)
    assert report.rows == 6 and report.added == 2
    assert [line for line, _ in report.bad_rows] == [3, 4, 5, 6]
    reasons = [r for _, r in report.bad_rows]
    assert reasons[0] == "empty patient id" and "request type" in reasons[1]
    text = str(report) + repr(report.bad_rows)
    assert "IPP100000" not in text


def test_semicolon_csv_and_custom_columns(tmp_path: Path) -> None:
    csv_path = write_csv(
        tmp_path / "custom.csv", ["IPP7;opposition;2024-02-02"], header="ipp;type;recu_le"
    )
    excl = ExclusionList()
    excl.import_requests(csv_path, KEY, id_column="ipp", type_column="type", date_column="recu_le")
    assert excl.pseudonyms == {KEY.patient("IPP7")}


def test_errors_name_the_file_not_the_ids(tmp_path: Path, requests_csv: Path) -> None:
    missing_cols = write_csv(tmp_path / "cols.csv", ["IPP1,opposition"], header="id,type")
    with pytest.raises(ExclusionError, match=r"cols\.csv"):
        ExclusionList().import_requests(missing_cols, KEY)
    excl = ExclusionList()
    excl.import_requests(requests_csv, KEY)
    with pytest.raises(ExclusionError, match="another pseudonymisation key"):
        excl.import_requests(requests_csv, PseudonymKey(b"some-other-key-0123456789"))


def test_load_refuses_edited_or_broken_files(tmp_path: Path, requests_csv: Path) -> None:
    excl = ExclusionList()
    excl.import_requests(requests_csv, KEY)
    path = tmp_path / "excl.json"
    excl.save(path)
    data = json.loads(path.read_text())
    data["entries"].pop()
    path.write_text(json.dumps(data))
    with pytest.raises(ExclusionError, match="version"):
        ExclusionList.load(path)
    path.write_text("{not json")
    with pytest.raises(ExclusionError, match=r"excl\.json"):
        ExclusionList.load(path)
    assert len(ExclusionList.load(tmp_path / "absent.json", missing_ok=True)) == 0
    with pytest.raises(ExclusionError):
        ExclusionList([ExclusionEntry("abc", "forget", "2024-01-01")])


def test_among_gives_the_listed_patients_of_a_dataset(tmp_path):
    entries = [ExclusionEntry(f"p{i:03d}", "opposition", "2024-01-01") for i in range(50)]
    entries.append(ExclusionEntry("p007", "erasure", "2024-02-01"))
    built = ExclusionList(entries)
    built.save(tmp_path / "e.json")
    dataset = {"p007", "p049", "p050", "q1"}
    for lst in (built, ExclusionList.load(tmp_path / "e.json"),
                ExclusionList.load(tmp_path / "e.json", cache=False)):  # fmt: skip
        assert lst.among(dataset) == {"p007", "p049"} == lst.pseudonyms & dataset
        assert lst.among(set()) == frozenset()
