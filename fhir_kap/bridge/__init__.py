"""The bridge (layer 4, entry point; the only Flask user): a FHIR facade and the KAP API for partners.

`create_app(settings, options)` builds everything; nothing is kept in module globals.
"""

from __future__ import annotations

from .app import BridgeOptions, create_app

__all__ = ["BridgeOptions", "create_app"]
