"""Radiology reports written from the phantom's findings, with identifiers planted in them.

Each report records the exact span of every identifier it holds, with an eds-pseudo-like
label (NOM, PRENOM, IPP, NDA, SECU, TEL, ADRESSE, DATE, DATE_NAISSANCE, MAIL, ZIP, VILLE,
HOPITAL), so a scrubber's recall and precision can be measured against them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from foundation.synthetic.anatomy import Anatomy, calcium_score, nodule_lobe
from foundation.synthetic.identities import (
    PatientIdentity,
    Physician,
    date_text,
    nir_forms,
    phone_forms,
)

LOBES_FR = {
    "LSD": "lobe supérieur droit",
    "LM": "lobe moyen",
    "LID": "lobe inférieur droit",
    "LSG": "lobe supérieur gauche",
    "LIG": "lobe inférieur gauche",
}
LOBES_EN = {
    "LSD": "right upper lobe",
    "LM": "right middle lobe",
    "LID": "right lower lobe",
    "LSG": "left upper lobe",
    "LIG": "left lower lobe",
}


@dataclass
class SpannedText:
    """Text assembled piece by piece, remembering where each labelled identifier sits."""

    parts: list[str] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    _pos: int = 0

    def add(self, text: str, label: str | None = None) -> SpannedText:
        if label:
            self.spans.append(
                {"text": text, "label": label, "start": self._pos, "end": self._pos + len(text)}
            )
        self.parts.append(text)
        self._pos += len(text)
        return self

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class StudyFacts:
    """What a report is written about."""

    kind: str  # "CT" | "XR" | "MR"
    date: dt.date
    accession: str
    anatomy: Anatomy
    prior_date: dt.date | None = None


def _fr_number(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}".replace(".", ",")


def _physician(t: SpannedText, doc: Physician, rng: np.random.Generator) -> None:
    t.add(f"{doc.title} ")
    if rng.random() < 0.4:
        t.add(doc.person.first, "PRENOM").add(" ")
    t.add(doc.person.last if rng.random() < 0.5 else doc.person.last.upper(), "NOM")


def _header(t: SpannedText, p: PatientIdentity, s: StudyFacts, rng, english: bool) -> None:
    h = p.hospital
    t.add(h.name, "HOPITAL").add("\n")
    t.add("Radiology department - Phone " if english else "Service d'imagerie médicale - Tél. ")
    t.add(str(rng.choice(phone_forms(h.phone.replace(" ", ""))[:3])), "TEL").add("\n\n")
    female = p.person.sex == "F"
    civ = ("Mrs " if female else "Mr ") if english else ("Mme " if female else "M. ")
    t.add("Patient: " if english else "Patient : ").add(civ)
    if rng.random() < 0.6:
        t.add(p.person.first, "PRENOM").add(" ").add(p.person.last.upper(), "NOM")
    else:
        t.add(p.person.last.upper(), "NOM").add(" ").add(p.person.first, "PRENOM")
    born = ", born " if english else (", née le " if female else ", né le ")
    t.add(born).add(date_text(p.birth_date, rng), "DATE_NAISSANCE")
    t.add(" - MRN " if english else " - IPP ").add(p.ipp, "IPP").add("\n")
    if rng.random() < 0.6:
        t.add("Address: " if english else "Adresse : ").add(p.street, "ADRESSE").add(", ")
        t.add(p.zip, "ZIP").add(" ").add(p.city, "VILLE").add("\n")
    if rng.random() < 0.6:
        t.add("Phone: " if english else "Tél. : ")
        t.add(str(rng.choice(phone_forms(p.phone)[:3])), "TEL").add("\n")
    if rng.random() < 0.4 and not english:
        t.add("N° SS : ").add(str(rng.choice(nir_forms(p.nir))), "SECU").add("\n")
    t.add("Exam date: " if english else "Examen du ").add(date_text(s.date, rng), "DATE")
    t.add(" - Accession no. " if english else " - N° d'examen : ").add(s.accession, "NDA")
    t.add("\n")
    t.add("Referring physician: " if english else "Médecin demandeur : ")
    _physician(t, p.referrer, rng)
    t.add("\n\n")


def _findings_fr(s: StudyFacts) -> tuple[list[str], list[str]]:
    a = s.anatomy
    ctr = a.ctr
    body, concl = [], []
    if s.kind == "MR":
        if ctr > 0.5:
            body.append("Dilatation des cavités cardiaques, ventricule gauche dilaté.")
            concl.append("Cardiomégalie avec dilatation ventriculaire gauche.")
        else:
            body.append("Cavités cardiaques de taille normale. Ventricule gauche non dilaté.")
            concl.append("IRM cardiaque sans anomalie morphologique notable.")
        return body, concl
    heart = f"index cardiothoracique estimé à {_fr_number(ctr)}"
    if ctr > 0.56:
        body.append(f"Cardiomégalie importante ({heart}).")
        concl.append("Cardiomégalie importante.")
    elif ctr > 0.5:
        body.append(f"Cardiomégalie modérée ({heart}).")
        concl.append("Cardiomégalie modérée.")
    else:
        body.append(f"Silhouette cardiaque de taille normale ({heart}).")
    if s.kind == "CT":
        score, n = calcium_score(a), len(a.calcifications)
        if n == 0:
            body.append("Absence de calcification coronaire visible (score calcique 0).")
        else:
            burden = "minimes" if score < 100 else "modérées" if score < 400 else "étendues"
            body.append(
                f"Calcifications coronaires {burden} ({n} foyers), "
                f"score calcique estimé à {round(score)}."
            )
            concl.append(f"Calcifications coronaires {burden} (score {round(score)}).")
    visible = [n for n in a.nodules if s.kind == "CT" or n.radius >= 4.0]
    for n in visible:
        mm = round(2 * n.radius)
        lobe = LOBES_FR[nodule_lobe(a, n)]
        word = "Nodule pulmonaire solide" if s.kind == "CT" else "Opacité nodulaire"
        body.append(f"{word} de {mm} mm du {lobe}.")
        concl.append(f"Nodule de {mm} mm du {lobe}, à contrôler.")
    if not visible:
        body.append("Pas de nodule pulmonaire suspect.")
    body.append("Pas d'épanchement pleural. Pas de pneumothorax.")
    if not concl:
        concl.append("Examen sans anomalie significative.")
    return body, concl


def _findings_en(s: StudyFacts) -> tuple[list[str], list[str]]:
    a = s.anatomy
    body, concl = [], []
    big = a.ctr > 0.5
    body.append(f"Cardiothoracic ratio about {a.ctr:.2f}: {'enlarged' if big else 'normal'} heart.")
    concl.append("Cardiomegaly." if big else "Normal heart size.")
    if s.kind == "CT":
        score = calcium_score(a)
        body.append(f"Coronary artery calcium score about {round(score)}.")
    for n in a.nodules if s.kind == "CT" else ():
        body.append(f"{round(2 * n.radius)} mm solid nodule in the {LOBES_EN[nodule_lobe(a, n)]}.")
    body.append("No pleural effusion.")
    return body, concl


TITLES = {
    "CT": ("SCANNER THORACIQUE SANS INJECTION", "CHEST CT WITHOUT CONTRAST"),
    "XR": ("RADIOGRAPHIE THORACIQUE DE FACE", "CHEST RADIOGRAPH, PA VIEW"),
    "MR": ("IRM CARDIAQUE", "CARDIAC MRI"),
}


def write_report(
    p: PatientIdentity, s: StudyFacts, rng: np.random.Generator, english: bool = False
) -> tuple[str, list[dict]]:
    """The report text of a study and the identifier spans planted in it."""
    t = SpannedText()
    _header(t, p, s, rng, english)
    t.add(TITLES[s.kind][1 if english else 0] + "\n\n")
    if english:
        t.add("Indication: shortness of breath.\n\n")
    else:
        t.add("Indication : dyspnée d'effort, bilan cardiovasculaire.\n\n")
    if s.prior_date is not None:
        t.add("Comparison with the exam of " if english else "Comparaison avec l'examen du ")
        t.add(date_text(s.prior_date, rng), "DATE").add(".\n\n")
    body, concl = (_findings_en if english else _findings_fr)(s)
    t.add("Findings:\n" if english else "Résultats :\n").add("\n".join(body) + "\n\n")
    t.add("Conclusion:\n" if english else "Conclusion :\n").add("\n".join(concl) + "\n\n")
    t.add("Report signed by " if english else "Compte rendu validé par le ")
    _physician(t, p.radiologist, rng)
    signed = s.date + dt.timedelta(days=int(rng.integers(0, 2)))
    t.add(", le " if not english else ", on ").add(date_text(signed, rng), "DATE").add(".\n")
    if rng.random() < 0.3:
        t.add("Contact : " if not english else "Contact: ").add(p.email, "MAIL").add("\n")
    return t.text, t.spans
