"""Kopf operator for DreamBoothJob resources. Imports dreambooth_api.config only, never torch."""

__version__ = "0.2.0"
