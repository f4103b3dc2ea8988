"""``python -m dara_ws_cli``: the ``dara-ws`` command without its installed script."""

from .main import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
