"""Fake French identities for the synthetic cohort: patients, physicians, hospitals.

Every value here is invented. Names that are also common words ("Petit", "Blanc", "Nice")
are left out on purpose: a privacy test that finds a planted name in scrubbed output must
mean a leak, not a French adjective in "petit nodule".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

FIRST_F = (
    "Jeanne", "Françoise", "Monique", "Catherine", "Nathalie", "Isabelle", "Sylvie", "Martine",
    "Christine", "Brigitte", "Hélène", "Sophie", "Élodie", "Camille", "Chantal", "Nicole",
    "Josiane", "Danielle", "Odile", "Véronique", "Agnès", "Colette", "Simone", "Yvette",
    "Geneviève", "Aurélie", "Louise", "Madeleine", "Ginette", "Solange",
)  # fmt: skip
FIRST_M = (
    "Michel", "Philippe", "Alain", "Bernard", "Jacques", "Daniel", "Patrick", "Gérard", "René",
    "Christian", "Thierry", "Didier", "Pascal", "Olivier", "François", "Laurent", "Éric",
    "Hervé", "Yves", "Gilles", "Marcel", "Robert", "Serge", "Henri", "Lucien", "Maurice",
    "Raymond", "Jean-Claude", "Jean-Pierre", "Dominique",
)  # fmt: skip
SURNAMES = (
    "Dupont", "Durand", "Lefebvre", "Moreau", "Leroy", "Bertrand", "Fournier", "Girard",
    "Bonnet", "Dupuis", "Lambert", "Fontaine", "Rousseau", "Vincent", "Muller", "Lefèvre",
    "Mercier", "Guérin", "Garnier", "Chevalier", "Gauthier", "Perrin", "Clément", "Mathieu",
    "Masson", "Marchand", "Duval", "Dumont", "Lemaire", "Meunier", "Blanchard", "Giraud",
    "Brunet", "Gaillard", "Barbier", "Arnaud", "Martinez", "Schmitt", "Leroux", "Vidal",
    "Caron", "Picard", "Fabre", "Aubert", "Lemoine", "Renaud", "Lacroix", "Leclerc", "Rolland",
    "Guillot", "Hubert", "Carpentier", "Sanchez", "Deschamps", "Vasseur", "Poirier", "Charpentier",
    "Ménard", "Maillard", "Schneider", "Fernandez", "Le Gall", "Bouvier", "Prévost", "Besson",
    "Langlois", "Pelletier", "Lévêque", "Perrier", "Leblanc", "Lebrun", "Marchal", "Monnier",
    "Michaud", "Rodriguez", "Guichard", "Tessier", "Chauvin", "Humbert", "Reynaud", "Cordier",
    "Delaunay", "Pasquier", "Carlier", "Laporte",
)  # fmt: skip
STREETS = (
    "rue des Lilas", "avenue Victor Hugo", "boulevard Voltaire", "rue de la République",
    "impasse des Tilleuls", "chemin des Vignes", "allée des Acacias", "place Gambetta",
    "rue Pasteur", "rue Jean Jaurès", "avenue du Général Leclerc", "rue Émile Zola",
    "boulevard de Strasbourg", "rue des Écoles", "avenue des Peupliers",
)  # fmt: skip
# (city, postal code, département digits used in the NIR)
CITIES = (
    ("Créteil", "94000", "94"), ("Montreuil", "93100", "93"), ("Lyon", "69003", "69"),
    ("Marseille", "13005", "13"), ("Bordeaux", "33000", "33"), ("Toulouse", "31400", "31"),
    ("Lille", "59000", "59"), ("Rennes", "35000", "35"), ("Strasbourg", "67000", "67"),
    ("Nantes", "44000", "44"), ("Grenoble", "38000", "38"), ("Dijon", "21000", "21"),
    ("Angers", "49100", "49"), ("Rouen", "76000", "76"), ("Limoges", "87000", "87"),
    ("Versailles", "78000", "78"), ("Argenteuil", "95100", "95"), ("Vincennes", "94300", "94"),
    ("Boulogne-Billancourt", "92100", "92"), ("Paris", "75013", "75"),
)  # fmt: skip
MONTHS_FR = (
    "janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
    "octobre", "novembre", "décembre",
)  # fmt: skip
EMAIL_DOMAINS = ("gmail.com", "orange.fr", "free.fr", "laposte.net", "wanadoo.fr")


@dataclass(frozen=True)
class Hospital:
    name: str
    short: str  # for e-mail domains and station names
    street: str
    zip: str
    city: str
    phone: str


HOSPITALS = (
    Hospital("Hôpital Saint-Aurèle", "hsa", "14 rue des Carmes", "94010", "Créteil",
             "01 49 81 21 11"),
    Hospital("Centre Hospitalier de Val-Brenne", "chvb", "2 avenue de la Gare", "69310",
             "Pierre-Bénite", "04 78 86 14 00"),
    Hospital("CHU Lumière-Sud", "chuls", "57 boulevard Pinel", "33076", "Bordeaux",
             "05 56 79 56 79"),
    Hospital("Clinique du Parc Montsouris", "cpm", "42 boulevard Jourdan", "75014", "Paris",
             "01 56 61 62 63"),
)  # fmt: skip


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    sex: str  # "F" | "M"

    @property
    def dicom_pn(self) -> str:
        """DICOM PN value: ``FAMILY^Given``."""
        return f"{self.last.upper()}^{self.first}"


@dataclass(frozen=True)
class Physician:
    person: Person
    title: str  # "Dr" | "Pr"

    @property
    def dicom_pn(self) -> str:
        return f"{self.person.last.upper()}^{self.person.first}^^{self.title}"


@dataclass(frozen=True)
class PatientIdentity:
    person: Person
    ipp: str  # patient number, DICOM PatientID
    birth_date: dt.date
    nir: str  # 15 digits, no spaces
    phone: str
    email: str
    street: str  # "12 rue des Lilas"
    zip: str
    city: str
    hospital: Hospital
    referrer: Physician
    radiologist: Physician
    operator: Person


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def make_person(rng: np.random.Generator, sex: str | None = None) -> Person:
    sex = sex or ("F" if rng.random() < 0.5 else "M")
    first = _choice(rng, FIRST_F if sex == "F" else FIRST_M)
    return Person(first=first, last=_choice(rng, SURNAMES), sex=sex)


def make_physician(rng: np.random.Generator) -> Physician:
    return Physician(make_person(rng), "Pr" if rng.random() < 0.25 else "Dr")


def nir_for(sex: str, birth: dt.date, dept: str, rng: np.random.Generator) -> str:
    """French social security number (NIR): 13 digits and a mod-97 key."""
    body = f"{1 if sex == 'M' else 2}{birth.year % 100:02d}{birth.month:02d}{dept}"
    body += f"{int(rng.integers(1, 990)):03d}{int(rng.integers(1, 999)):03d}"
    return body + f"{97 - int(body) % 97:02d}"


def make_patient(rng: np.random.Generator, index: int) -> PatientIdentity:
    """A patient's identity; ``index`` keeps IPPs unique within a cohort."""
    person = make_person(rng)
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 55 * 365)))
    city, zip_code, dept = _choice(rng, CITIES)
    mobile = "06" if rng.random() < 0.6 else "07"
    phone = mobile + "".join(f"{int(d)}" for d in rng.integers(0, 10, 8))
    local = f"{_ascii(person.first)}.{_ascii(person.last)}".lower().replace(" ", "")
    return PatientIdentity(
        person=person,
        ipp=f"8{int(rng.integers(10, 100))}{int(rng.integers(1000, 10000))}{index:04d}",
        birth_date=birth,
        nir=nir_for(person.sex, birth, dept, rng),
        phone=phone,
        email=f"{local}{int(rng.integers(1, 99))}@{_choice(rng, EMAIL_DOMAINS)}",
        street=f"{int(rng.integers(1, 180))} {_choice(rng, STREETS)}",
        zip=zip_code,
        city=city,
        hospital=_choice(rng, HOSPITALS),
        referrer=make_physician(rng),
        radiologist=make_physician(rng),
        operator=make_person(rng),
    )


def _ascii(text: str) -> str:
    table = str.maketrans("éèêëàâäîïôöûüùçÉ", "eeeeaaaiioouuucE")
    return text.translate(table).replace("-", "")


# ---- written forms (each one planted somewhere must be listed for the privacy tests)


def phone_forms(digits: str) -> list[str]:
    """French phone number written as ``06 12 34 56 78``, with dots, or ``+33 6 ...``."""
    pairs = [digits[i : i + 2] for i in range(0, 10, 2)]
    return [
        " ".join(pairs),
        ".".join(pairs),
        "+33 " + digits[1] + " " + " ".join(pairs[1:]),
        digits,
    ]


def nir_forms(nir: str) -> list[str]:
    spaced = f"{nir[0]} {nir[1:3]} {nir[3:5]} {nir[5:7]} {nir[7:10]} {nir[10:13]} {nir[13:]}"
    return [spaced, nir]


def date_forms(d: dt.date) -> list[str]:
    """Every way a date is written in the cohort: DICOM, French numeric, French words, ISO."""
    return [
        d.strftime("%Y%m%d"),
        d.strftime("%d/%m/%Y"),
        f"{d.day} {MONTHS_FR[d.month - 1]} {d.year}",
        d.isoformat(),
    ]


def date_text(d: dt.date, rng: np.random.Generator) -> str:
    """A date as a French report would write it (one of the forms of ``date_forms``)."""
    forms = date_forms(d)
    return forms[1] if rng.random() < 0.75 else forms[2]


def person_values(p: Person) -> list[str]:
    return [p.first, p.last, p.last.upper(), p.dicom_pn, f"{p.first} {p.last.upper()}"]


def identity_values(ident: PatientIdentity) -> list[str]:
    """Identifier values of a patient independent of any study (studies add their own)."""
    h = ident.hospital
    values = person_values(ident.person)
    for doc in (ident.referrer, ident.radiologist):
        values += [*person_values(doc.person), doc.dicom_pn]
    values += person_values(ident.operator)
    values += [ident.ipp, ident.email, ident.street, ident.zip, ident.city]
    values += [h.name, h.street, h.zip, h.city, *phone_forms(h.phone.replace(" ", ""))]
    values += [institution_address(h), patient_address(ident)]
    values += date_forms(ident.birth_date) + nir_forms(ident.nir) + phone_forms(ident.phone)
    return values


def institution_address(h: Hospital) -> str:
    return f"{h.street}, {h.zip} {h.city}"


def patient_address(ident: PatientIdentity) -> str:
    return f"{ident.street}, {ident.zip} {ident.city}"
