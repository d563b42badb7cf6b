"""Purpose limitation: the projects approved to use a dataset, and the check training runs.

The manifest lists them in ``extra["projects"]``: ``[{"id", "approval", "date", "expires",
"revoked"}]`` (``approval``: the reference of the ethics / DPO decision). Approvals are edited
in place on the current manifest (no new dataset version: the shards do not change) and are
carried over to the versions an erasure publishes. ``check_project`` (or ``check_usable``,
which also refuses revoked/purged versions) is what pretraining and fine-tuning call with their
``--project`` before reading a sample.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from foundation.governance import audit
from foundation.governance.dataset_lock import dataset_lock
from foundation.governance.erase import check_not_revoked
from foundation.shards.manifest import Manifest


class ProjectNotApprovedError(PermissionError):
    """The dataset may not be used for this project (names the manifest and the reason)."""


def _today(today: dt.date | None) -> dt.date:
    return today or dt.date.today()


def approvals(manifest: Manifest) -> list[dict[str, Any]]:
    return list(manifest.extra.get("projects") or [])


def approve(
    manifest_path: str | Path,
    project_id: str,
    approval: str,
    expires: dt.date,
    *,
    today: dt.date | None = None,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> dict[str, Any]:
    """Approve (or re-approve) ``project_id`` until ``expires``; returns the record."""
    if not project_id.strip() or not approval.strip():
        raise ValueError("a project id and an approval reference are required")
    if expires < _today(today):
        raise ValueError(f"approval of {project_id} would already be expired ({expires})")
    path = Path(manifest_path)
    with dataset_lock(path, wait=lock_wait, operation="project approve"):
        manifest = Manifest.load(path)
        check_not_revoked(manifest)
        record = {
            "id": project_id,
            "approval": approval,
            "date": _today(today).isoformat(),
            "expires": expires.isoformat(),
        }
        others = [p for p in approvals(manifest) if p["id"] != project_id]
        manifest.extra["projects"] = [*others, record]
        audit.save_and_record(
            manifest,
            path,
            "project approve",
            audit_log,
            project=project_id,
            approval=approval,
            expires=record["expires"],
        )
    return record


def revoke(
    manifest_path: str | Path,
    project_id: str,
    *,
    today: dt.date | None = None,
    audit_log: str | Path | None = None,
    lock_wait: float = 0.0,
) -> dict[str, Any]:
    """Withdraw the approval of ``project_id`` (kept in the list, marked ``revoked``)."""
    path = Path(manifest_path)
    with dataset_lock(path, wait=lock_wait, operation="project revoke"):
        manifest = Manifest.load(path)
        records = approvals(manifest)
        for record in records:
            if record["id"] == project_id:
                record["revoked"] = _today(today).isoformat()
                break
        else:
            raise KeyError(f"{path}: project {project_id} is not approved for this dataset")
        manifest.extra["projects"] = records
        audit.save_and_record(manifest, path, "project revoke", audit_log, project=project_id)
    return record


def check_project(
    manifest: Manifest, project_id: str | None, today: dt.date | None = None
) -> dict[str, Any]:
    """The approval of ``project_id`` for this dataset; ``ProjectNotApprovedError`` if there is
    none, it was revoked or it expired (``expires`` is the last valid day)."""
    where = manifest.location or manifest.dataset
    if not project_id:
        raise ProjectNotApprovedError(
            f"{where}: no project given (--project); every use of "
            "this dataset must name an approved project"
        )
    for record in approvals(manifest):
        if record["id"] != project_id:
            continue
        if record.get("revoked"):
            raise ProjectNotApprovedError(
                f"{where}: approval of project {project_id} was revoked on {record['revoked']}"
            )
        if dt.date.fromisoformat(record["expires"]) < _today(today):
            raise ProjectNotApprovedError(
                f"{where}: approval {record['approval']} of project {project_id} expired on"
                f" {record['expires']}"
            )
        return record
    approved = ", ".join(p["id"] for p in approvals(manifest) if not p.get("revoked")) or "none"
    raise ProjectNotApprovedError(
        f"{where}: dataset {manifest.dataset} is not approved for project {project_id}"
        f" (approved: {approved})"
    )


def check_usable(
    manifest: Manifest, project_id: str | None = None, today: dt.date | None = None
) -> dict[str, Any] | None:
    """Everything a training run checks: the version is current (not revoked, purged or merged
    away) and, when ``project_id`` is given, approved for it; returns the approval."""
    check_not_revoked(manifest)
    return None if project_id is None else check_project(manifest, project_id, today)
