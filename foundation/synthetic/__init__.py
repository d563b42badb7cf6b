"""A synthetic cohort: DICOM/NIfTI studies, French reports, opt-out requests, biomarker labels.

``generate_cohort(out, n_patients, seed)`` writes a PACS-like export whose identifiers,
geometry and labels are all known, so ingest, de-identification and fine-tuning can be
tested end to end without real patient data.
"""

from foundation.synthetic.cohort import CohortSummary, generate_cohort

__all__ = ["CohortSummary", "generate_cohort"]
