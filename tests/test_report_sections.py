"""Report section selection: findings and conclusion, in French or English, else the whole."""

import pytest

from foundation.data.report_sections import select_sections, split_sections

FRENCH = """[HOPITAL]
Service d'imagerie médicale - Tél. [TEL]
Patient : M. [NOM], né le [DATE_NAISSANCE] - IPP [IPP]
Médecin demandeur : Dr [NOM]

SCANNER THORACIQUE

Indication : dyspnée d'effort.

RÉSULTATS :
Cardiomégalie modérée.
Pas de nodule.

Conclusion: Cardiomégalie modérée.

Compte rendu validé par le Dr [NOM], le [DATE].
"""

ENGLISH = """CHEST CT
History: cough.
Technique: non-contrast CT.
Findings:
2 mm nodule in the right upper lobe.
Impression:
Small nodule.
Electronically signed by [NOM]
"""


def test_french_report_keeps_findings_and_conclusion_only():
    text = select_sections(FRENCH)
    assert text.startswith("RÉSULTATS :")
    assert "Cardiomégalie modérée.\nPas de nodule." in text
    assert text.endswith("Conclusion: Cardiomégalie modérée.")
    for noise in ("[HOPITAL]", "Patient", "Médecin demandeur", "Indication", "validé"):
        assert noise not in text


def test_english_headings_and_signature():
    assert [name for name, _ in split_sections(ENGLISH)] == [
        "", "indication", "technique", "findings", "conclusion",
    ]  # fmt: skip
    text = select_sections(ENGLISH, ["conclusion"])
    assert text == "Impression:\nSmall nodule."


def test_report_without_headings_is_kept_whole():
    free = "Cardiomégalie. Pas d'épanchement pleural."
    assert select_sections(free) == free
    assert select_sections(FRENCH, None) == FRENCH  # None: always the whole report


def test_heading_words_inside_sentences_are_not_headings():
    text = "Résultats :\nLa conclusion du précédent examen : inchangée.\n"
    assert [name for name, _ in split_sections(text)] == ["findings"]


def test_unknown_section_name_is_refused():
    with pytest.raises(ValueError, match="unknown report sections"):
        select_sections(FRENCH, ["findings", "impressions"])


def test_training_tokenizer_reads_the_sections(tmp_path):
    """The data module's tokenizer sees findings + conclusion, not the scrubbed header."""
    from foundation.data.datamodule import _HFTokenize
    from foundation.data.tokenizer import train_tokenizer

    train_tokenizer([FRENCH, ENGLISH] * 4, tmp_path, vocab_size=300)
    whole = _HFTokenize(str(tmp_path), 256, None)
    sections = _HFTokenize(str(tmp_path), 256, ["findings", "conclusion"])
    ids_whole = whole([FRENCH])["input_ids"][0]
    ids = sections([FRENCH])["input_ids"][0]
    text = sections.tokenizer.decode(ids, skip_special_tokens=True)
    assert "HOPITAL" not in text.upper() and "demandeur" not in text
    assert "conclusion" in text.lower()
    assert int((ids != sections.tokenizer.pad_token_id).sum()) < int(
        (ids_whole != whole.tokenizer.pad_token_id).sum()
    )
