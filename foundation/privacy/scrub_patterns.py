"""The patterns and lexicons of report scrubbing: what an identifier looks like.

Regular expressions and word lists only, no logic: the labels and their placeholders, titles
and labels that come before a name, identifier labels (IPP, NDA, NIR), shapes (phones,
e-mails, URLs, NIR), addresses, postal codes and cities, hospitals, and dates in French,
English and numeric forms. ``foundation.privacy.scrub`` applies them. Letters include
accented ones (``U``, ``L``); names are Capitalised or UPPER words, hyphens allowed.
"""

from __future__ import annotations

import re

PLACEHOLDERS: dict[str, str] = {
    "NOM": "[NOM]", "PRENOM": "[NOM]", "DATE": "[DATE]", "DATE_NAISSANCE": "[DATE_NAISSANCE]",
    "TEL": "[TEL]", "MAIL": "[MAIL]", "ADRESSE": "[ADRESSE]", "ZIP": "[ZIP]", "VILLE": "[VILLE]",
    "SECU": "[SECU]", "IPP": "[IPP]", "NDA": "[NDA]", "URL": "[URL]", "HOPITAL": "[HOPITAL]",
}  # fmt: skip
# When spans overlap, the merged span takes the label that comes first here.
PRIORITY = ("URL", "MAIL", "SECU", "IPP", "NDA", "TEL", "DATE_NAISSANCE", "DATE", "ADRESSE",
            "ZIP", "HOPITAL", "VILLE", "NOM", "PRENOM")  # fmt: skip


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


U, L = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"  # upper- and lower-case letters, accents included
WORD = rf"[{U}][{L}{U}'’]*(?:-[{U}][{L}{U}'’]*)*"  # Capitalised or UPPER word, hyphens allowed
_PARTICLE = r"(?:de|du|des|la|le|les|van|von|der|den|di|da|del|dos|d['’]|l['’])"
NAME_TOKEN = re.compile(rf"(?:(?i:{_PARTICLE})[ \t]?)?(?:[{U}]\.|{WORD})")
# Capitalised words that start sentences or headings rather than names.
NOT_NAMES = _words(
    """le la les l un une des du de et ou il elle ils on pas absence présence presence examen
    scanner irm tdm radiographie radio échographie echographie angioscanner indication technique
    résultat résultats resultat conclusion compte rendu patient patiente homme femme enfant né
    née service hôpital hopital chu clinique centre institut tél tel fax ipp nda nir date dossier
    the a an no in on of at findings impression history comparison exam report signed pour avec
    sans merci cordialement confraternellement bonjour cher chère ami collègue confrère
    madame monsieur mme mlle dr pr docteur professeur rpps adeli finess mrn pid nip ins"""
)

_TITLE = (
    r"(?:(?<![\w.])(?:Dr|Dre|Drs|DR|Pr|Prof|Mme|MME|Mmes|Mlle|MLLE|Mr|MR|Mrs|Ms|Miss)(?:\.|(?!\w))"
    r"|(?<![\w.])M\.|(?i:\b(?:docteur|professeur|madame|monsieur|mademoiselle)\b))"
)
TITLE_RE = re.compile(rf"{_TITLE}(?:[ \t]+(?:le|la)[ \t]+{_TITLE})?[ \t]*")
# Labels before a name. After a "strong" label anything capitalised is a name; after a "weak"
# one ("Patient :", "Radiologue :") it takes two words or an UPPER one, as "Patient : Asymptomatique"
# is not a name but "Patient : DUPONT" and "Patient : Jean Dupont" are.
NAME_LABEL_STRONG_RE = re.compile(
    r"(?i:\b(?:nom(?:\s+(?:de\s+naissance|d['’]usage|marital|de\s+jeune\s+fille))?|pr[ée]noms?"
    r"|(?:patient\s+)?name|surname|first\s+name|given\s+name)\s*[:\-]"
    r"|\b(?:valid[ée]e?|sign[ée]e?|dict[ée]e?|r[ée]dig[ée]e?|interpr[ée]t[ée]e?|demand[ée]e?"
    r"|adress[ée]e?|relu|lu)\s+par\s*:?"
    r"|\b(?:signed|reported|dictated|read|requested|referred|verified|approved)\s+by\s*:?"
    r"|\bcopie\s+(?:à|a)\s*:?)[ \t]*"
)
NAME_LABEL_WEAK_RE = re.compile(
    r"(?i:\b(?:patient(?:e)?|m[ée]decin(?:\s+(?:prescripteur|demandeur|traitant|r[ée]f[ée]rent"
    r"|radiologue))?|prescripteur|demandeur|radiologue|manipulat(?:eur|rice)|correspondant"
    r"|referring\s+physician|physician|radiologist)\s*[:\-])[ \t]*"
)
_ID = r"([A-Z]{0,4}[\-\s]?\d[\dA-Z\-/]{3,})"  # an identifier holds at least 4 characters, a digit
_ID_SEP = r"\s*(?:n°|no\.?|num(?:[ée]ro)?\.?|#)?\s*[:=#]?\s*"
ID_RES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "IPP",
        re.compile(
            r"(?i:\b(?:IPP|I\.P\.P\.?|identifiant\s+(?:patient|permanent)|id\s+patient|patient\s+id"
            rf"|PID|MRN|medical\s+record\s+(?:number|no\.?)|RPPS|ADELI|FINESS))\b{_ID_SEP}{_ID}"
        ),
    ),
    (
        "NDA",  # visit (séjour) numbers; accession numbers take the same placeholder
        re.compile(
            r"(?i:\b(?:NDA|N\.D\.A\.?|(?:n°|num[ée]ro)\s*(?:de\s+)?(?:s[ée]jour|venue|dossier|passage)"
            r"|(?:visit|encounter)\s+(?:number|no\.?|id)|accession(?:\s+(?:number|no\.?|n°))?"
            r"|(?:n°|num[ée]ro)\s*(?:d['’]\s*)?(?:examen|accession)|acc\.?\s*(?:no\.?|n°|#)))"
            rf"{_ID_SEP}{_ID}"
        ),
    ),
    (
        "SECU",
        re.compile(
            r"(?i:\b(?:NIR|INS|n°\s*(?:de\s+)?s[ée]cu(?:rit[ée]\s+sociale)?|num[ée]ro\s+de\s+"
            r"s[ée]cu(?:rit[ée]\s+sociale)?|s[ée]curit[ée]\s+sociale|social\s+security(?:\s+number)?))"
            r"\s*[:#]?\s*([12][\d \tAB]{11,20}\d)"
        ),
    ),
)
SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("URL", re.compile(r"(?i:\b(?:https?://|www\.)[^\s<>\"]+[^\s<>\".,;:!?)\]])")),
    ("MAIL", re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+")),
    # NIR: sex, year, month, department (2A/2B), commune, order, key
    (
        "SECU",
        re.compile(
            r"(?<![\d\w])[12][ \t]?\d{2}[ \t]?(?:0[1-9]|1[0-2]|[2-9]\d)[ \t]?(?:\d{2}|2[AB])[ \t]?\d{3}"
            r"[ \t]?\d{3}(?:[ \t]?\d{2})?(?![\d\w])"
        ),
    ),
    # French numbers (0X XX XX XX XX, +33 (0)X ...) and international ones (+CC ...)
    (
        "TEL",
        re.compile(
            r"(?<![\w+])(?:(?:\+|00)33[ \t]?(?:\(0\)[ \t]?)?[1-9]|0[1-9])(?:[ \t.\-]?\d{2}){4}(?!\d)"
            r"|(?<![\w+])\+[1-9]\d{0,2}[ \t.\-]?(?:\(\d{1,4}\)[ \t.\-]?)?\d{1,4}(?:[ \t.\-]?\d{2,4}){2,4}(?!\d)"
        ),
    ),
)
_STREET = (
    r"(?i:rue|avenue|av\.|bd|boulevard|blvd|place|pl\.|all[ée]e|chemin|impasse|route|rte|quai"
    r"|cours|square|r[ée]sidence|cit[ée]|lotissement|lieu[- ]dit|hameau|passage|voie|faubourg"
    r"|rond[- ]point|parvis|esplanade|promenade|sentier|villa)"
)
_STREET_LINK = r"(?:(?i:de|du|des|la|le|les|aux|à|et|sur|sous|en)|[dlDL]['’])"
# particles then a Capitalised word, repeated: "de la Paix", "d'Alésia", "Jean Jaurès"
_STREET_NAME = (
    rf"(?:(?:[ \t]+{_STREET_LINK})*[ \t]*(?<=[ \t'’])(?:[dlDL]['’])?{WORD}){{1,6}}(?:[ \t]+\d+)?"
)
ADDRESS_RE = re.compile(
    rf"(?<![\w,])\d{{1,4}}(?:[ \t]?(?:bis|ter|quater|[A-Da-d]))?[ \t]*,?[ \t]+{_STREET}\b{_STREET_NAME}"
    rf"|\b(?i:rue|avenue|boulevard|impasse|all[ée]e|quai|chemin)(?=[ \t]+(?:{_PARTICLE}[ \t]*)*[{U}])"
    rf"{_STREET_NAME}"
    rf"|(?<!\w)\d{{1,5}}[A-Za-z]?(?:[ \t]+{WORD}){{1,4}}[ \t]+(?:Street|St\.|Road|Rd\.?|Avenue|Ave\.?"
    r"|Lane|Ln\.?|Drive|Boulevard|Blvd\.?|Court|Way|Terrace)\b"
    r"|(?<!\w)(?:BP|CS|B\.P\.)[ \t]?\d{2,6}\b"
)
_CITY_WORD = rf"(?:[{U}][{L}]{{2,}}|[{U}]{{4,}})(?:-(?:[{U}][{L}]+|[{U}]+|[{L}]+))*"
_CITY = (
    rf"(?:(?:Le|La|Les|L['’])[ \t])?{_CITY_WORD}(?:[ \t](?:sur|sous|en|lès|lez|de|du|des|aux|d['’]|l['’])"
    rf"[ \t]?{_CITY_WORD})?(?:[ \t]+(?i:cedex)(?:[ \t]+\d{{1,2}})?)?"
)
ZIP_CITY_RE = re.compile(
    rf"(?<![\d\w])((?:0[1-9]|[1-8]\d|9[0-8])\d{{3}}|2[AB]\d{{3}})[ \t]+({_CITY})"
)
ZIP_LABEL_RE = re.compile(r"(?i:\b(?:code\s+postal|CP|zip(?:\s+code)?)\s*[:]?\s*)(\d{5})\b")
CITY_CONTEXT_RE = re.compile(
    r"(?i:\b(?:domicili[ée]e?|demeurant|habitant|r[ée]sidant|habite|vit|originaire|n[ée]e?"
    rf"|lives|living|resides|born)[ \t]+(?:à|a|au|en|in|at|de)[ \t]+)({_CITY})"
)
CITIES = _words(
    """Paris Marseille Lyon Toulouse Nice Nantes Montpellier Strasbourg Bordeaux Lille Rennes
    Reims Toulon Grenoble Dijon Angers Nîmes Nimes Villeurbanne Clermont-Ferrand Aix-en-Provence
    Brest Limoges Amiens Perpignan Metz Besançon Besancon Orléans Orleans Rouen Mulhouse Caen
    Nancy Argenteuil Montreuil Saint-Denis Roubaix Tourcoing Avignon Créteil Creteil Poitiers
    Versailles Nanterre Colombes Pau Vitry-sur-Seine Boulogne-Billancourt Saint-Étienne
    Saint-Etienne Annecy Colmar Lorient Vannes Quimper Bayonne Chambéry Chambery
    Troyes Cherbourg Calais Dunkerque Bobigny Villejuif Suresnes Garches Bondy Clichy
    Neuilly-sur-Seine Kremlin-Bicêtre Évry Evry Pontoise Cergy Meaux Melun Ajaccio Bastia"""
) | {"Le Havre", "La Rochelle", "La Roche-sur-Yon"}
CITY_RE = re.compile(r"(?<![\w\-])(?:" + "|".join(sorted(map(re.escape, CITIES), key=len, reverse=True)) + r")(?![\w\-])")  # fmt: skip
_HOSPITAL_HEAD = (
    r"(?:(?i:h[ôo]pital|h[ôo]pitaux|hospital|groupe[ \t]+hospitalier|centre[ \t]+hospitalier"
    r"(?:[ \t]+(?:universitaire|r[ée]gional|intercommunal|g[ée]n[ée]ral))*|clinique|polyclinique"
    r"|centre[ \t]+(?:de[ \t]+lutte[ \t]+contre[ \t]+le[ \t]+cancer|d['’]imagerie(?:[ \t]+m[ée]dicale)?"
    r"|de[ \t]+radiologie|m[ée]dical)|cabinet[ \t]+de[ \t]+radiologie|hospices[ \t]+civils)"
    r"|Institut|Fondation|CHU|CHRU|CHR|CHG|CHI|CH|GHU|GH)"
)
HOSPITAL_RE = re.compile(
    rf"\b{_HOSPITAL_HEAD}(?:(?:[ \t]+|[ \t]?[-–][ \t]?|[ \t](?i:{_PARTICLE})[ \t]?|[ \t](?i:{_PARTICLE})[ \t](?i:{_PARTICLE})[ \t])"
    rf"(?:{WORD})){{1,6}}(?:[ \t]*\(?AP-?HP\)?)?"
    r"|(?<![\w\-])(?:AP-HP|APHP|AP–HP|HCL|AP-HM|APHM)(?![\w\-])"
)


# ---- dates (French, English, numeric) and the words that make one a birth date ----------------
MONTHS_FR = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
             "septembre", "octobre", "novembre", "décembre")  # fmt: skip
MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August",
             "September", "October", "November", "December")  # fmt: skip
WEEKDAYS_FR = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
_MONTH_FR = (
    r"(?P<mon>(?i:janv(?:ier|\.)?|f[ée]v(?:rier|r\.?|\.)?|mars|avr(?:il|\.)?|mai|juin"
    r"|juil(?:let|\.)?|ao[uû]t|sept(?:embre|\.)?|oct(?:obre|\.)?|nov(?:embre|\.)?"
    r"|d[ée]c(?:embre|\.)?))"
)
_MONTH_EN = r"(?P<mon>(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?)"
_WEEKDAY = r"(?:(?P<wd>(?i:lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche))[ \t]+)?"
DATE_RES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fr", re.compile(rf"(?<!\w){_WEEKDAY}(?P<d>1er|\d{{1,2}})[ \t]+{_MONTH_FR}(?!\w)(?:[ \t]+(?P<y>\d{{4}}))?(?!\w)")),
    ("fr", re.compile(rf"(?<!\w){_MONTH_FR}[ \t]+(?P<y>(?:19|20)\d{{2}})(?!\w)")),
    ("en", re.compile(rf"(?<!\w){_MONTH_EN}[ \t]+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?[ \t]+(?P<y>\d{{4}})(?!\w)")),
    ("en", re.compile(rf"(?<!\w)(?P<d>\d{{1,2}})(?:st|nd|rd|th)?[ \t]+{_MONTH_EN}[ \t]+(?P<y>\d{{4}})(?!\w)")),
    ("en", re.compile(rf"(?<![\w,])(?<!\d )(?<!\d\t){_MONTH_EN}[ \t]+(?P<y>(?:19|20)\d{{2}})(?!\w)")),
    ("num", re.compile(r"(?<![\d/.\-])(?P<d>\d{1,2})(?P<sep>[/.\-])(?P<m>\d{1,2})(?P=sep)(?P<y>\d{4}|\d{2})(?![\d/\-]|\.\d)")),
    ("num", re.compile(r"(?<![\d/.\-])(?P<y>(?:19|20)\d{2})(?P<sep>[/.\-])(?P<m>\d{1,2})(?P=sep)(?P<d>\d{1,2})(?![\d/\-]|\.\d)")),
    ("num", re.compile(r"(?<![\w/.\-])(?P<y>(?:19|20)\d{2})(?P<m>0[1-9]|1[0-2])(?P<d>0[1-9]|[12]\d|3[01])(?![\d/.\-])")),
    ("num", re.compile(r"(?<![\d/.\-])(?P<m>0?[1-9]|1[0-2])/(?P<y>(?:19|20)\d{2})(?![\d/\-]|\.\d)")),
)  # fmt: skip
BIRTH_CONTEXT_RE = re.compile(
    r"(?i:\bn[ée]e?\s*(?:\(e\))?(?:\s+(?:à|a)\s+\S+)?\s+le|\bdate\s+de\s+naissance|\bDDN|\bD\.D\.N\.?"
    r"|\bDOB|\bdate\s+of\s+birth|\bbirth\s*date|\bborn(?:\s+on)?|\bnaissance)\s*[:\-]?\s*$"
)
