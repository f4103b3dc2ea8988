"""dara-ws, the command line: the demo server (``dara-ws serve``) and a probe client (``dara-ws probe``).

Its own package, outside ``dara_ws_core``, because it imports every adapter (``dara_ws_websockets``,
``dara_ws_aiohttp``, ``dara_ws_asgi``, ``dara_ws_redis``), which the core never does. Installed as the
``dara-ws`` script; ``python -m dara_ws_cli`` runs the same ``main``.
"""

import os

# The demo server builds no model a pydantic plugin instruments, and an installed plugin costs
# every process at start (logfire's, which dara-core brings, about 20 MiB: docs/performance.md).
# Before the first model is built, so before the core is imported; an explicit setting wins
# (PYDANTIC_DISABLE_PLUGINS= , empty, loads them all).
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from .main import CLIError, build_demo, build_parser, main, raise_open_files_limit

__all__ = ["CLIError", "build_demo", "build_parser", "main", "raise_open_files_limit"]
