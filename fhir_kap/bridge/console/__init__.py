"""The operator console under /console (issue 16): pages in views.py, its gate in security.py,
Jinja templates and one stylesheet beside them (docs/operations/console.md).

Room: bridge/ (layer 4, entry point; the only Flask user): may import any room; nothing imports it but cli/.
"""

from __future__ import annotations

from flask import Flask

__all__ = ["register"]


def register(app: Flask) -> None:
    """Add the console's blueprint, its gate (operator sessions) and the operator tables."""
    from .views import install

    with app.app_context():
        install(app)
