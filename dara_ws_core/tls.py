"""TLS sockets counted from their TCP accept, for the socket adapters' ``ssl=``.

A listener made with ``ssl=`` hands a socket to its protocol only once the TLS handshake is
done: until then no adapter sees it, and ``ServerConfig.max_connections`` and
``max_connections_per_address`` did not count it. A peer could hold as many sockets open as the
listener's backlog lets in within a ``handshake_timeout``, from one address, beyond every bound
configured. :class:`CountedTLS` listens on plain TCP instead and runs the TLS handshake itself
(``loop.start_tls``, on asyncio's and on uvloop's loops), so that each socket is counted from its
accept (:meth:`Endpoint.take_slot`, the same count as a plain socket's): over a bound it is closed
at once (no 503 can reach a peer before its TLS handshake: ``answerable=False``), and while its
handshake is unfinished it is a socket still in its handshake, evicted to make room as any other.
The library's protocol gets the socket once the handshake is done, as from a listener with
``ssl=``, and counts it from there as it counts a plain socket.
"""

from __future__ import annotations

__all__ = ["CountedTLS"]

import asyncio
import ssl
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, cast

from .endpoint import Admission, Endpoint, host_of

#: What builds the library's protocol for one socket (a listener's protocol factory).
_ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class CountedTLS:
    """TLS with ``context`` for a plain TCP listener whose sockets ``endpoints`` count (one
    endpoint; a uvicorn server's hooked ones, a list that may grow), the TLS handshake bounded
    by their smallest ``handshake_timeout`` and the TLS close by their ``close_timeout``.

    Built by :meth:`take_from` from the options of a listener; :meth:`factory` wraps its
    protocol factory (:meth:`gate` one protocol)."""

    __slots__ = ("_tasks", "context", "endpoints", "handshake_timeout", "shutdown_timeout")

    def __init__(self, context: ssl.SSLContext, endpoints: Sequence[Endpoint], *,
                 handshake_timeout: float | None = None, shutdown_timeout: float | None = None) -> None:
        self.context = context
        self.endpoints = endpoints
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        #: The handshakes in progress (a task each, kept until done).
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def take_from(cls, options: MutableMapping[str, Any], endpoints: Sequence[Endpoint]) -> CountedTLS | None:
        """The TLS of a listener's ``loop.create_server`` keyword ``options``, taken out of
        them (``ssl`` and its ``ssl_handshake_timeout`` and ``ssl_shutdown_timeout``): the
        listener is then plain TCP, and its protocol factory goes through :meth:`factory`.
        ``None`` (and ``options`` unchanged) without ``ssl``."""
        context = options.get("ssl")
        if not context:
            return None
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext, not {type(context).__name__}")
        del options["ssl"]
        return cls(context, endpoints, handshake_timeout=options.pop("ssl_handshake_timeout", None),
                   shutdown_timeout=options.pop("ssl_shutdown_timeout", None))

    def factory(self, factory: _ProtocolFactory) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the plain TCP listener: :meth:`gate` of ``factory``."""
        return lambda: _Gate(self, factory)

    def gate(self, factory: _ProtocolFactory) -> asyncio.Protocol:
        """The protocol of one accepted socket: it counts the socket, runs its TLS handshake,
        then hands it to ``factory()``'s protocol."""
        return _Gate(self, factory)

    def _timeouts(self) -> tuple[float | None, float | None]:
        configs = [endpoint.config for endpoint in self.endpoints]
        handshake, shutdown = self.handshake_timeout, self.shutdown_timeout
        if configs:
            handshake = handshake or min(config.handshake_timeout for config in configs)
            shutdown = shutdown or min(config.close_timeout for config in configs)
        return handshake, shutdown


class _Gate(asyncio.Protocol):
    """One socket of a :class:`CountedTLS` listener, from its accept until its TLS handshake is
    done: the plain socket's protocol, then the protocol asyncio's TLS layer hands the first
    bytes to (``start_tls`` gives no ``connection_made``, and the client's first request often
    comes with its last handshake message: held until the hand-over). It holds the socket's
    slots meanwhile; at the hand-over it frees them and the library's protocol takes its own in
    its ``connection_made``, in the same step: the socket is counted from its accept to its end,
    once. Every other end (full, evicted, the handshake failed or timed out, the peer gone)
    frees them once, and closes the socket."""

    __slots__ = ("_counted", "_factory", "_held", "_host", "_lost", "_protocol", "_raw", "_tls")

    def __init__(self, tls: CountedTLS, factory: _ProtocolFactory) -> None:
        self._tls, self._factory = tls, factory
        self._raw: asyncio.Transport | None = None
        self._host: str | None = None
        self._counted: list[tuple[Endpoint, Admission]] = []  # until freed
        #: Bytes read before the TLS layer could take them (see connection_made), or what the
        #: client sent with its handshake's last message (often its request) until the hand-over.
        self._held = bytearray()
        self._lost = False
        self._protocol: asyncio.Protocol | None = None  # the library's, once handed over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = raw = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._host = host = host_of(raw.get_extra_info("peername"))
        self._counted = [(endpoint, endpoint.take_slot(host, self._evict, answerable=False))
                         for endpoint in self._tls.endpoints]
        if any(admission is not Admission.ADMIT for _, admission in self._counted):
            self._free()
            raw.abort()  # full: no answer can reach a peer before its TLS handshake
            return
        raw.pause_reading()  # the client's hello waits for the TLS layer (start_tls resumes)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._secure(raw))
        self._tls._tasks.add(task)
        task.add_done_callback(self._tls._tasks.discard)
        # uvloop starts reading once connection_made returns, paused or not: a hello read
        # before start_tls took the socket is held, then handed to the TLS layer right after its
        # connection_made and before any later read. start_tls schedules that connection_made
        # (and its resume_reading) from the task's first turn, which comes before this one's.
        loop.call_soon(loop.call_soon, self._hand_hello)

    def _evict(self) -> bool:
        # The key the socket waits under in the endpoints' slots until the hand-over (a bound
        # method, equal each time it is taken): to make room, it goes, whatever its handshake's
        # state; its own release then changes no count (ConnectionSlots.evicted).
        if self._raw is not None:
            self._raw.abort()
        return True

    def _free(self) -> None:
        counted, self._counted = self._counted, []
        for endpoint, admission in counted:
            endpoint.free_slot(admission, self._host, self._evict)

    async def _secure(self, raw: asyncio.Transport) -> None:
        handshake, shutdown = self._tls._timeouts()
        secured: asyncio.Transport | None = None
        try:
            if not self._lost and not raw.is_closing():  # not evicted before its turn
                secured = cast(asyncio.Transport, await asyncio.get_running_loop().start_tls(
                    raw, self, self._tls.context, server_side=True,
                    ssl_handshake_timeout=handshake, ssl_shutdown_timeout=shutdown))
        except Exception:  # failed, timed out or gone: the TLS layer says (at debug) why
            pass
        finally:
            # A handshake ended by the peer or an eviction returns no transport or a closed one.
            served = secured is not None and not self._lost and not secured.is_closing()
            self._free()
            if not served:
                raw.abort()
        if secured is not None and served:
            try:
                self._hand_over(secured)
            except BaseException:  # the library's protocol failed: not a socket left uncounted
                raw.abort()
                raise

    def _hand_hello(self) -> None:
        raw, hello = self._raw, bytes(self._held)
        if not hello or raw is None or raw.is_closing() or raw.get_protocol() is self:
            return  # nothing held, or gone before start_tls took the socket
        self._held.clear()
        tls = cast(asyncio.BufferedProtocol, raw.get_protocol())  # asyncio's and uvloop's are
        view = memoryview(hello)
        while view:
            buffer = memoryview(tls.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)
            view = view[size:]

    def _hand_over(self, secured: asyncio.Transport) -> None:
        self._protocol = protocol = cast(asyncio.Protocol, self._factory())
        secured.set_protocol(protocol)
        protocol.connection_made(secured)  # counts the socket, as a plain one
        early = bytes(self._held)
        self._held.clear()
        if early and not secured.is_closing():
            protocol.data_received(early)
        if early and self._raw is not None:
            self._raw.resume_reading()  # paused while the early bytes were held

    # The socket's calls until start_tls takes it, then the TLS layer's until the hand-over.
    # (An end of stream before the hand-over: the socket closes, and is never handed over.)

    def data_received(self, data: bytes) -> None:
        self._held += data
        if self._raw is not None:
            self._raw.pause_reading()  # no more until what is held is handed on

    def connection_lost(self, exc: Exception | None) -> None:
        if self._protocol is not None:
            self._protocol.connection_lost(exc)
            return
        self._lost = True
        self._free()
