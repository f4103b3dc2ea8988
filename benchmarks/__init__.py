"""Benchmarks of dara-ws-core against the raw transport and python-socketio (issue 4).

Run everything with ``python -m benchmarks.run`` (see ``benchmarks/README.md``). Every figure is
printed next to a ratio against the raw ``websockets`` baseline measured in the same run.

Process layout: the orchestrator (:mod:`benchmarks.run`) starts each server in its own process
(:mod:`benchmarks.server`) and the client load in one or more other processes
(:mod:`benchmarks.client`); they talk JSON lines over stdin/stdout (:mod:`benchmarks.procs`). The
sockets only ever bind and connect to 127.0.0.1.
"""

__all__: list[str] = []
