"""Ingest: find series in a PACS export, read them with their geometry, preprocess once.

pydicom's validation warnings quote the offending header value ("Invalid value for VR DA:
'...'"), which may be a birth date or a name: the ingest never validates values on read, so
no header value can reach a log line through pydicom.
"""

import pydicom.config

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
