"""foundation: pretraining multimodal radiology foundation models on pseudonymised archives."""

__version__ = "0.1.0"
