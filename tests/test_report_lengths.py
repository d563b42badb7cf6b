"""Report lengths in tokens: measured at tokenizer training, and a warning for budgets that cut."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from foundation.data import report_lengths as rl
from foundation.data.tokenizer import train_tokenizer

WORDS = [
    "cardiomégalie",
    "modérée",
    "silhouette",
    "normale",
    "nodule",
    "pulmonaire",
    "lobe",
    "supérieur",
    "droit",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [" ".join(WORDS[i % len(WORDS) :] + WORDS) for i in range(40)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=200)


def _reports(word_counts: list[int]) -> list[str]:
    return [" ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in word_counts]


def test_lengths_are_what_the_text_tower_receives(tokenizer):
    reports = _reports([3, 40, 7, 120, 1])
    lengths = rl.token_lengths(reports, tokenizer, batch=2)  # chunks of 2 and a remainder
    expected = [len(tokenizer(r)["input_ids"]) for r in reports]
    assert lengths.tolist() == expected
    assert all(n >= c + 2 for n, c in zip(lengths, [3, 40, 7, 120, 1], strict=True))  # CLS, SEP


def test_summary_counts_the_reports_over_each_budget():
    lengths = np.array([10] * 70 + [200] * 20 + [600] * 10)
    stats = rl.summarise(lengths, budgets=(128, 256, 512))
    assert stats["reports"] == 100
    assert stats["truncated"] == {"128": 0.3, "256": 0.1, "512": 0.1}
    assert stats["percentiles"][50] == 10 and stats["percentiles"][100] == 600
    assert rl.share_over(stats, 128) == 0.3  # a measured budget: exact
    assert rl.share_over(stats, 100) == pytest.approx(0.3, abs=0.011)  # from the percentiles
    assert rl.share_over(stats, 300) == pytest.approx(0.1, abs=0.011)
    assert rl.share_over(stats, 700) == 0.0
    with pytest.raises(ValueError, match="no report"):
        rl.summarise(np.array([], dtype=np.int64))


def test_warning_when_the_budget_cuts_reports(tmp_path):
    assert rl.budget_warning(tmp_path, 128) is None  # nothing measured: nothing to say
    rl.save(rl.summarise(np.array([100] * 60 + [180] * 40)), tmp_path)
    message = rl.budget_warning(tmp_path, 128)
    assert message is not None and "max_report_tokens=128" in message and "40%" in message
    assert str(tmp_path / rl.FILE) in message
    assert rl.budget_warning(tmp_path, 256) is None
    (tmp_path / rl.FILE).write_text(json.dumps({"percentiles": [1, 2]}), encoding="utf-8")
    assert rl.budget_warning(tmp_path, 128) is None  # unreadable figures: warned, not fatal


def test_tokenizer_training_saves_the_lengths_and_the_data_module_warns(ingested, tmp_path, caplog):
    from foundation.data.datamodule import ShardDataModule
    from foundation.data.report_corpus import iter_reports, train_tokenizer_from_manifest

    manifest = ingested.result.manifest_path
    n = train_tokenizer_from_manifest(manifest, tmp_path / "tok", vocab_size=500)
    stats = json.loads((tmp_path / "tok" / rl.FILE).read_text(encoding="utf-8"))
    assert stats["reports"] == n == len(list(iter_reports(manifest)))
    shortest = stats["percentiles"][0]
    assert shortest > 20  # whole reports with their header, in tokens

    def warnings_for(budget: int, sections: list[str] | None = None) -> list[str]:
        caplog.clear()
        dm = ShardDataModule(
            manifest=str(manifest),
            tokenizer_dir=str(tmp_path / "tok"),
            max_report_tokens=budget,
            report_sections=sections,
            num_workers=0,
            pin_memory=False,
        )
        with caplog.at_level(logging.WARNING, logger="foundation.data.datamodule"):
            dm.setup("fit")
            dm.train_dataloader()
        return [r.getMessage() for r in caplog.records if "max_report_tokens" in r.getMessage()]

    assert warnings_for(shortest - 1)  # cuts every report
    assert not warnings_for(stats["percentiles"][100])  # cuts none
    assert not warnings_for(shortest - 1, ["findings", "conclusion"])  # sections read less
