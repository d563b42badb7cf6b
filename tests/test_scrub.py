"""Report scrubbing: every planted identifier goes, clinical content stays."""

from __future__ import annotations

import datetime as dt
import itertools
import re

import pytest

from foundation.privacy.scrub import PLACEHOLDERS, evaluate_scrubber, find_spans, scrub_report

# A French report with identifiers of every eds-pseudo label, each written once.
REPORT = """CENTRE HOSPITALIER - Hôpital Européen Georges-Pompidou (AP-HP)
Service de radiologie - Tél. secrétariat : 01 56 09 20 00
Patient : DURAND-LEROY Sylvie, née le 07/11/1948
IPP : 8001234567     NDA : 2300456789     N° d'examen : ACC20240115
NIR : 2 48 11 75 112 045 27
Adresse : 14 bis avenue Jean Jaurès, 69007 Lyon. Portable +33 6 12 34 56 78
Contact : sylvie.durand@exemple.fr - dossier https://pacs.chu.example/viewer?study=42
Médecin prescripteur : Dr Antoine FABRE, CHU de Montpellier
Vue en consultation par Mme Claire Besson le 3 février 2024.

SCANNER THORACIQUE du 15 janvier 2024 à 10h30
Indication : suivi de nodule, comparaison avec l'examen du 02/06/2023.
Résultats : nodule de 8 mm du segment 6, stable. Épanchement de 12 x 9 mm.
Score calcique 412. ICT 0,55. FEVG 55 %. Tassement de D7. Hypersignal T2.
Conclusion : stabilité. Contrôle à 6 mois.
Compte rendu validé par Pr Hélène MARCHAND.
"""
PLANTED = [
    {"text": "Hôpital Européen Georges-Pompidou", "label": "HOPITAL"},
    {"text": "01 56 09 20 00", "label": "TEL"},
    {"text": "DURAND-LEROY", "label": "NOM"},
    {"text": "Sylvie", "label": "PRENOM"},
    {"text": "07/11/1948", "label": "DATE_NAISSANCE"},
    {"text": "8001234567", "label": "IPP"},
    {"text": "2300456789", "label": "NDA"},
    {"text": "ACC20240115", "label": "NDA"},
    {"text": "2 48 11 75 112 045 27", "label": "SECU"},
    {"text": "14 bis avenue Jean Jaurès", "label": "ADRESSE"},
    {"text": "69007", "label": "ZIP"},
    {"text": "Lyon", "label": "VILLE"},
    {"text": "+33 6 12 34 56 78", "label": "TEL"},
    {"text": "sylvie.durand@exemple.fr", "label": "MAIL"},
    {"text": "https://pacs.chu.example/viewer?study=42", "label": "URL"},
    {"text": "Antoine", "label": "PRENOM"},
    {"text": "FABRE", "label": "NOM"},
    {"text": "CHU de Montpellier", "label": "HOPITAL"},
    {"text": "Claire", "label": "PRENOM"},
    {"text": "Besson", "label": "NOM"},
    {"text": "3 février 2024", "label": "DATE"},
    {"text": "15 janvier 2024", "label": "DATE"},
    {"text": "02/06/2023", "label": "DATE"},
    {"text": "Hélène", "label": "PRENOM"},
    {"text": "MARCHAND", "label": "NOM"},
]
CLINICAL = [
    "Nodule de 8 mm du segment 6 du lobe inférieur droit.",
    "Lésion de 12 x 9 mm, rehaussée au temps portal.",
    "Score calcique 412 (percentile 75).",
    "ICT 0,55. FEVG 55 %. Pas d'épanchement péricardique.",
    "Hypersignal T2 et FLAIR de la substance blanche, séquence T1 après gadolinium.",
    "Tassement cunéiforme de D7 et L1, discopathie L4-L5 et L5-S1.",
    "Examen réalisé à 10h30, PDL 345 mGy.cm, CTDIvol 7,2 mGy.",
    "BI-RADS 4 à droite, ACR 3 à gauche. Lung-RADS 2. PI-RADS 3. TI-RADS 4.",
    "Contrôle à 3 mois selon les recommandations de Fleischner.",
    "Angle de Cobb de 25° ; épaisseur de coupe 2,5 mm ; matrice 512 x 512.",
    "Absence d'embolie pulmonaire. Tronc de l'artère pulmonaire à 28 mm.",
    "Stade IV de Fazekas. Score ASPECTS 8/10. Classification Bosniak IIF.",
    "No pulmonary embolism. Nodule in segment 6 measuring 8 mm, Lung-RADS 2.",
    "Le patient présente une fracture du radius distal droit.",
    "Reprise de 3 cours de chimiothérapie ; héparine 25000 UI par jour.",
    "Suivi pour PR. Érosions des métacarpo-phalangiennes. Suivi de MM IgG kappa.",
    "Mise en place de la sonde. Drépanocytose connue. Séquelles en regard de C5-C6.",
    "Ménisque interne : Fissure horizontale. Patient : Asymptomatique.",
    "Reins : kyste Bosniak II. Rachis : arthrose C5-C6, RECIST 1.1 somme 45 mm.",
    "Heart size normal. No pleural effusion. Impression: No acute process.",
]


def _present(needle: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", text, re.IGNORECASE) is not None


@pytest.mark.parametrize("shift", [None, 17, -200])
def test_every_planted_identifier_is_removed(shift) -> None:
    out = scrub_report(REPORT, shift_days=shift)
    leaked = [p["label"] for p in PLANTED if _present(p["text"], out)]
    assert leaked == []
    # the clinical part survives
    for kept in ("nodule de 8 mm du segment 6", "12 x 9 mm", "Score calcique 412", "ICT 0,55",
                 "FEVG 55 %", "Tassement de D7", "Hypersignal T2", "10h30", "Contrôle à 6 mois"):  # fmt: skip
        assert kept in out
    assert "[DATE_NAISSANCE]" in out and "[SECU]" in out and "[HOPITAL]" in out
    assert ("[DATE]" in out) == (shift is None)


@pytest.mark.parametrize("sentence", CLINICAL)
def test_clinical_sentences_unchanged(sentence) -> None:
    assert scrub_report(sentence, shift_days=30) == sentence
    assert scrub_report(sentence) == sentence


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Vu par Dr J. Martin ce jour.", "Vu par Dr [NOM] ce jour."),
        ("Patiente : Mme LE GOFF Annick", "Patiente : Mme [NOM]"),
        ("Monsieur le Professeur Jean de La Fontaine a vu", "Monsieur le Professeur [NOM] a vu"),
        ("Dr MARTIN. Scanner normal.", "Dr [NOM]. Scanner normal."),
        ("Dr MARTIN IRM cérébrale.", "Dr [NOM] IRM cérébrale."),
        ("M. Paul Roux et Mlle Anne Petit", "M. [NOM] et Mlle [NOM]"),
        ("Signed by: Jane DOE", "Signed by: [NOM]"),
    ],
)
def test_names_after_titles_and_labels(text, expected) -> None:
    assert scrub_report(text) == expected


def test_deny_values_removed_whatever_case_and_accents() -> None:
    deny = ["Hélène", "LEFÈVRE", "8001234567", "CHU Sainte-Anne", "Jean-Pierre"]
    text = (
        "Vu avec helene lefevre puis HELENE Lefèvre (dossier 8001234567). "
        "Adressée par le chu sainte anne, suivie par Jean Pierre. Marcheuse, Lefevreux."
    )
    out = scrub_report(text, deny=deny)
    for value in ["helene", "lefevre", "Lefèvre", "8001234567", "sainte anne", "Jean Pierre"]:
        assert not _present(value, out), value
    # word boundaries: longer words that contain a deny value stay
    assert "Marcheuse" in out and "Lefevreux" in out


def test_deny_is_word_bounded() -> None:
    assert scrub_report("Le marché du lundi; Marcel est venu.", deny=["Marc"]) == (
        "Le marché du lundi; Marcel est venu."
    )


@pytest.mark.parametrize(
    ("text", "shift", "expected"),
    [
        ("Examen du 15/01/2024.", 10, "Examen du 25/01/2024."),
        ("Examen du 15/01/2024.", -20, "Examen du 26/12/2023."),
        ("Examen du 5/1/24.", 1, "Examen du 6/1/24."),
        ("Examen du 2024-02-28.", 2, "Examen du 2024-03-01."),
        ("Examen du 15.01.2024.", 365, "Examen du 14.01.2025."),
        ("Examen du 15 janvier 2024.", -20, "Examen du 26 décembre 2023."),
        ("Examen du 1er mars 2024.", -1, "Examen du 29 février 2024."),
        ("Le lundi 15 janvier 2024.", 1, "Le mardi 16 janvier 2024."),
        ("Seen on March 3, 2024.", 30, "Seen on April 2, 2024."),
        ("Seen on 3 March 2024.", -3, "Seen on 29 February 2024."),
        ("Examen du 15/01/2024.", None, "Examen du [DATE]."),
        (
            "Née le 07/11/1948, vue le 15/01/2024.",
            10,
            "Née le [DATE_NAISSANCE], vue le 25/01/2024.",
        ),
        ("Date de naissance : 7 novembre 1948.", 10, "Date de naissance : [DATE_NAISSANCE]."),
        ("DOB: 1948-11-07", 5, "DOB: [DATE_NAISSANCE]"),
    ],
)
def test_date_shift(text, shift, expected) -> None:
    assert scrub_report(text, shift_days=shift) == expected


def test_intervals_between_report_dates_survive_shift() -> None:
    out = scrub_report("Examens du 10/01/2024 et du 09/03/2024.", shift_days=-123)
    a, b = re.findall(r"\d{2}/\d{2}/\d{4}", out)
    parse = lambda s: dt.datetime.strptime(s, "%d/%m/%Y").date()  # noqa: E731
    assert (parse(b) - parse(a)).days == (dt.date(2024, 3, 9) - dt.date(2024, 1, 10)).days
    assert a != "10/01/2024"


def test_english_report() -> None:
    text = (
        "Patient name: John SMITH. MRN: 00123456. Referring physician: Dr. Jane Doe.\n"
        "Phone +44 20 7946 0958, email j.smith@example.org, 221B Baker Street.\n"
        "CT chest on January 12, 2024: 6 mm nodule in the right upper lobe."
    )
    out = scrub_report(text)
    for value in ["John", "SMITH", "00123456", "Jane", "Doe", "7946 0958", "j.smith", "Baker",
                  "January 12, 2024"]:  # fmt: skip
        assert not _present(value, out), value
    assert "6 mm nodule in the right upper lobe" in out


def test_spans_are_disjoint_and_use_known_placeholders() -> None:
    spans = find_spans(REPORT, deny=["Sylvie", "DURAND-LEROY"], shift_days=3)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    assert {s.label for s in spans} <= set(PLACEHOLDERS)


def test_evaluate_scrubber_counts_recall_and_precision() -> None:
    leaky = "Vu par Lucienne ce jour. Nodule de 8 mm. Pas de suite à donner le 12/02/2024."
    reports = {"a": REPORT, "b": leaky}
    planted = {
        "a": PLANTED,
        # "Lucienne" has no title, label or header entry: it leaks; the date is not planted
        "b": [{"text": "Lucienne", "label": "PRENOM"}],
    }
    res = evaluate_scrubber(reports, planted)
    assert res["reports"] == 2
    assert res["per_label"]["PRENOM"]["recall"] == pytest.approx(4 / 5)
    assert res["per_label"]["NOM"]["recall"] == 1.0
    assert res["per_label"]["DATE_NAISSANCE"]["recall"] == 1.0
    assert res["leaks"] == [("b", "PRENOM")]
    assert 0 < res["precision"] < 1  # the unplanted date in "b" counts against precision
    assert res["per_label"]["DATE"]["precision"] < 1
    assert 0 < res["recall"] < 1
    # with the name on the study's deny-list nothing leaks any more
    res = evaluate_scrubber(reports, planted, deny={"b": ["Lucienne"]})
    assert res["recall"] == 1.0 and res["leaks"] == []
