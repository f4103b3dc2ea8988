"""dara-ws, the command line: the demo server (``dara-ws serve``) and a probe client (``dara-ws probe``).

Its own package, outside ``dara_ws_core``, because it imports every adapter (``dara_ws_websockets``,
``dara_ws_aiohttp``, ``dara_ws_asgi``, ``dara_ws_redis``), which the core never does. Installed as the
``dara-ws`` script; ``python -m dara_ws_cli`` runs the same ``main``.
"""

from .main import CLIError, build_demo, build_parser, main, raise_open_files_limit

__all__ = ["CLIError", "build_demo", "build_parser", "main", "raise_open_files_limit"]
