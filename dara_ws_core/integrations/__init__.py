"""Drop-ins that put this library under an existing framework's own WebSocket layer.

* :mod:`dara_ws_core.integrations.dara`: ``install(config)`` in a Dara 1.30 app (extra ``[dara]``).

Nothing in the core imports this package; each integration imports its framework lazily.
"""

from __future__ import annotations

__all__: list[str] = []
