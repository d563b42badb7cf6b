"""`foundation optout import` holds the exclusion list's lock: two imports into one list at the
same time both land (neither rewrites the file from a stale read), and a held lock is reported
as one line with exit status 75, the list untouched."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_dataset_lock import held_by_thread

from foundation.cli import main
from foundation.privacy.exclusion import ExclusionList
from foundation.privacy.pseudonym import load_key

SECRET = "toy-secret-key-0123456789abcdef"


def _requests(path: Path, *patient_ids: str) -> Path:
    rows = "".join(f"{p},opposition,2025-03-0{i + 1}\n" for i, p in enumerate(patient_ids))
    path.write_text("patient_id,request_type,date_received\n" + rows, encoding="utf-8")
    return path


def _argv(requests: Path, lst: Path, key: Path, *extra: str) -> list[str]:
    return ["optout", "import", str(requests), "--list", str(lst), "--key-file", str(key), *extra]


@pytest.fixture()
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key.txt"
    path.write_text(SECRET + "\n", encoding="utf-8")
    return path


def test_concurrent_imports_into_one_list_keep_every_request(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lst = tmp_path / "exclusion_list.json"
    first = _requests(tmp_path / "a.csv", "PAT-A1", "PAT-A2")
    second = _requests(tmp_path / "b.csv", "PAT-B1")
    real = ExclusionList.import_requests

    def slow_import(self, *args, **kwargs):  # widen the read -> write window of each import
        out = real(self, *args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(ExclusionList, "import_requests", slow_import)
    codes: list[int] = []
    threads = [
        threading.Thread(
            target=lambda r=r: codes.append(main(_argv(r, lst, key_file, "--wait", "20")))
        )
        for r in (first, second)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [0, 0]
    key, listed = load_key(key_file), ExclusionList.load(lst)
    # without the lock both read the empty list and the later save drops the other's requests
    assert {key.patient(p) for p in ("PAT-A1", "PAT-A2", "PAT-B1")} == set(listed.pseudonyms)


def test_a_held_list_lock_refuses_the_import_and_leaves_the_list(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lst = tmp_path / "exclusion_list.json"
    assert main(_argv(_requests(tmp_path / "a.csv", "PAT-A1"), lst, key_file)) == 0
    before = lst.read_bytes()
    with held_by_thread(lst):
        capsys.readouterr()
        code = main(_argv(_requests(tmp_path / "b.csv", "PAT-B1"), lst, key_file))
        err = capsys.readouterr().err
    assert code == 75
    assert str(lst) in err and "test holder" in err and "PAT-B1" not in err
    assert lst.read_bytes() == before
    assert main(_argv(tmp_path / "b.csv", lst, key_file)) == 0  # once free, the same call lands
    assert len(ExclusionList.load(lst)) == 2
