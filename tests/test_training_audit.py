"""A training run's use of a dataset is refused without approval and recorded in the audit log."""

from __future__ import annotations

import datetime as dt
import types

import pytest

from foundation.data.datamodule import ShardDataModule
from foundation.governance import audit
from foundation.governance.projects import ProjectNotApprovedError, approve
from foundation.governance.toy import build_toy_dataset
from foundation.training.launch import record_training_use


def _trainer(tmp_path):
    return types.SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "run"))


def test_training_use_is_audited_with_its_project(tmp_path):
    ds = build_toy_dataset(tmp_path / "ds", n_patients=3)
    expires = dt.date.today() + dt.timedelta(days=30)
    approve(ds.manifest, "PRJ-42", "CPP-2026-001", expires)
    dm = ShardDataModule(manifest=str(ds.manifest), project="PRJ-42", num_workers=0)
    record_training_use(dm, _trainer(tmp_path), "pretrain")
    log = audit.default_log_path(ds.manifest)
    entries = audit.read(log)
    last = entries[-1]
    assert last["action"] == "pretrain" and last["project"] == "PRJ-42"
    assert last["dataset_version"] >= 1
    assert audit.verify(log).ok
    assert dm.lineage["project"] == "PRJ-42"


def test_unapproved_project_is_refused_before_anything_is_recorded(tmp_path):
    ds = build_toy_dataset(tmp_path / "ds", n_patients=3)
    dm = ShardDataModule(manifest=str(ds.manifest), project="NOT-APPROVED", num_workers=0)
    log = audit.default_log_path(ds.manifest)
    before = len(audit.read(log)) if log.exists() else 0
    with pytest.raises(ProjectNotApprovedError):
        record_training_use(dm, _trainer(tmp_path), "pretrain")
    after = len(audit.read(log)) if log.exists() else 0
    assert after == before
