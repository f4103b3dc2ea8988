"""The connection lifecycle (protocol.md section 5), transport-agnostic: the seed's ``ws_handler``.

An adapter calls :meth:`Endpoint.authenticate` before accepting (HTTP 403 on rejection) and
:meth:`Endpoint.serve` after. ``serve`` runs the connection with a
:class:`~dara_ws_core.driver.ConnectionDriver` (receive loop, send task, close), which returns when
every trace of it is gone. The endpoint holds what spans connections: the authenticator, one
sweeper task that checks every connection's timers, graceful shutdown, and the count of sockets
served (:class:`ConnectionSlots`: adapters call :meth:`Endpoint.take_slot` as they accept a
socket, and answer 503 or close it when the process or the peer's address is full).
"""

from __future__ import annotations

__all__ = ["DEFAULT_PATH", "Admission", "ConnectionSlots", "Endpoint", "Evict", "host_of", "ws_handler"]

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from .auth import Authenticator, Identity, holder_of, run_authenticator
from .config import ServerConfig
from .driver import ConnectionDriver, close_quietly
from .exceptions import (
    AuthenticationFailed,
    BackplaneError,
    CloseCode,
    EndpointClosed,
)
from .handler import WebSocketHandler
from .lifecycle import ConnectionHooks
from .logs import ConnectionLogger, current_source
from .manager import WebsocketManager
from .transport import HandshakeRequest, ReceivingCharge, Transport, TrustedProxies, address_key
from .upgrade import Refusal, read_target

logger = logging.getLogger("dara_ws_core")

#: Where Dara's server mounts the socket, and so where a stock client looks for it.
DEFAULT_PATH = "/api/core/ws"


class Admission(IntEnum):
    """What to do with a socket a transport has just accepted (:meth:`Endpoint.take_slot`)."""

    #: Serve it: a slot is held until :meth:`Endpoint.free_slot`.
    ADMIT = 0
    #: The process is full (``max_connections``): answer its handshake with 503 and
    #: ``Retry-After``, then close.
    REFUSE = 1
    #: Its address has ``max_connections_per_address`` sockets: the same answer.
    REFUSE_ADDRESS = 2
    #: Refused, and enough refused sockets wait for their answer already: close it at once.
    DROP = 3


#: What an adapter registers a socket still in its handshake under (:meth:`Endpoint.take_slot`):
#: called to make room for a newcomer, it closes the socket and returns ``True``, or returns
#: ``False`` if the socket is busy after all (a request being served), which keeps it.
Evict = Callable[[], bool]


class ConnectionSlots:
    """The count behind ``ServerConfig.max_connections`` and ``max_connections_per_address``:
    sockets served (connections and handshakes in progress), in all and by remote address, and
    refused sockets still waiting for their answer, each bounded, so that peers cannot take
    every descriptor of the process. Pure: the adapters report each socket's start and end.

    A socket registered with an ``evict`` callable is *waiting* (its request has not all
    arrived) until :meth:`settle`. When a newcomer would be refused, :meth:`victim` names a
    waiting socket whose going lets it in: sockets that send nothing never keep out a client
    that completes its handshake. When the newcomer's address is the one full, that is the
    address's own oldest; when the process is full, the oldest of the address holding the most
    waiting sockets (the oldest of all when its address holds as many), so that a few
    addresses opening sockets in a loop evict each other's, and a client whose request takes
    a round trip or a TLS exchange to arrive, alone in its handshake from its address, is
    evicted last. Refused sockets waiting for their request make room for newer refused ones,
    the oldest first."""

    __slots__ = ("_crowds", "_gone", "_most", "_refused", "_unanswerable", "_waiting", "_waiting_at",
                 "admitted", "by_address", "limit", "per_address", "refusing", "refusing_limit")

    def __init__(self, limit: int | None, per_address: int | None = None) -> None:
        self.limit = limit
        self.per_address = per_address
        #: Refused sockets answered 503 at most at once; beyond them, sockets are closed unread.
        bound = limit if limit is not None else per_address
        self.refusing_limit = 0 if bound is None else bound // 16 + 8
        self.admitted = 0
        self.refusing = 0
        #: Sockets served by remote host (only while ``per_address`` is set; none at zero).
        self.by_address: dict[str, int] = {}
        #: Admitted sockets waiting for their request, oldest first, with their address; the
        #: same by address (``None``: the sockets without one, together); refused ones waiting.
        self._waiting: dict[Evict, str | None] = {}
        self._waiting_at: dict[str | None, dict[Evict, None]] = {}
        self._refused: dict[Evict, None] = {}
        #: The waiting sockets no answer can reach yet (``answerable=False``: TLS handshakes).
        self._unanswerable: dict[Evict, None] = {}
        #: The addresses by how many waiting sockets they hold (each count's in the order they
        #: reached it), and the highest count: the most crowded address found in O(1), as
        #: counts move by one.
        self._crowds: dict[int, dict[str | None, None]] = {}
        self._most = 0
        #: Evicted sockets whose slot went to a newcomer: their release changes no count.
        self._gone: set[Evict] = set()

    @property
    def limit_reached(self) -> bool:
        """Whether ``limit`` sockets are served now."""
        return self.limit is not None and self.admitted >= self.limit

    @property
    def waiting(self) -> int:
        """Sockets (admitted or refused) registered as still waiting for their request."""
        return len(self._waiting) + len(self._refused)

    def _crowded(self, address: str | None) -> bool:
        return (self.per_address is not None and address is not None
                and self.by_address.get(address, 0) >= self.per_address)

    def check(self, address: str | None) -> Admission:
        """What :meth:`take` would answer for a socket from ``address`` (its host), changing
        nothing."""
        if self.limit_reached:
            refusal = Admission.REFUSE
        elif self._crowded(address):
            refusal = Admission.REFUSE_ADDRESS
        else:
            return Admission.ADMIT
        return refusal if self.refusing < self.refusing_limit else Admission.DROP

    def take(self, address: str | None = None, evict: Evict | None = None, *,
             answerable: bool = True) -> Admission:
        """A socket from ``address`` was accepted: whether to serve it. Every call is matched
        by one :meth:`release` with its result, address and ``evict`` (for a ``DROP`` it does
        nothing). With ``evict``, the socket is waiting for its request until :meth:`settle`.
        A socket no answer can reach yet (``answerable=False``: a TLS socket before its TLS
        handshake, which no 503 can reach) is refused with ``DROP``."""
        admission = self.check(address)
        if not answerable and admission is not Admission.ADMIT:
            admission = Admission.DROP
        if admission is Admission.ADMIT:
            self.admitted += 1
            if self.per_address is not None and address is not None:
                self.by_address[address] = self.by_address.get(address, 0) + 1
            if evict is not None:
                self._waiting[evict] = address
                mine = self._waiting_at.setdefault(address, {})
                mine[evict] = None
                self._recount(address, len(mine) - 1, len(mine))
                if not answerable:
                    self._unanswerable[evict] = None
        elif admission is not Admission.DROP:
            self.refusing += 1
            if evict is not None:
                self._refused[evict] = None
        return admission

    def settle(self, evict: Evict) -> None:
        """The socket registered with ``evict`` has sent its whole request: it is no longer
        evicted to make room."""
        if evict in self._waiting:
            self._unanswerable.pop(evict, None)
            address = self._waiting.pop(evict)
            mine = self._waiting_at[address]
            del mine[evict]
            self._recount(address, len(mine) + 1, len(mine))
            if not mine:
                del self._waiting_at[address]
        else:
            self._refused.pop(evict, None)

    def _recount(self, address: str | None, was: int, now: int) -> None:
        """``address`` went from ``was`` waiting sockets to ``now`` (one more or one fewer)."""
        crowds = self._crowds
        if was:
            crowd = crowds[was]
            del crowd[address]
            if not crowd:
                del crowds[was]
                if self._most == was:
                    self._most = now  # ``now`` is ``was - 1``: the address itself holds it
        if now:
            crowds.setdefault(now, {})[address] = None
            self._most = max(self._most, now)

    def victim(self, address: str | None, *, answerable: bool = True) -> tuple[Evict, Admission, str | None] | None:
        """When a socket from ``address`` would be refused (or dropped): the waiting socket to
        evict so that it is not, with its admission and address, no longer registered as
        waiting; ``None`` if none can make room. The caller calls it, then :meth:`evicted` if
        it closed. A refused socket makes room only for a newcomer ``answerable`` too."""
        if self._crowded(address):
            # One of the address's own: its going frees a process slot too.
            mine = self._waiting_at.get(address)
            if mine:
                evict = next(iter(mine))
                self.settle(evict)
                return evict, Admission.ADMIT, address
        elif self.limit_reached:
            if self._waiting:
                # The oldest waiting socket if its address holds the most (every address holds
                # one: the oldest overall), else the oldest of the first address holding the most.
                evict = next(iter(self._waiting))
                owner = self._waiting[evict]
                if len(self._waiting_at[owner]) < self._most:
                    owner = next(iter(self._crowds[self._most]))
                    evict = next(iter(self._waiting_at[owner]))
                self.settle(evict)
                return evict, Admission.ADMIT, owner
        else:
            return None
        if answerable and self.refusing >= self.refusing_limit and self._refused:
            evict = next(iter(self._refused))
            del self._refused[evict]
            return evict, Admission.REFUSE, None
        return None

    def unanswerable(self) -> list[tuple[Evict, Admission, str | None]]:
        """Every waiting socket taken with ``answerable=False`` (a TLS socket in its TLS
        handshake), as :meth:`victim` names one, each no longer registered as waiting: what a
        shutdown closes, as no request they may still send could be served. The caller calls
        each, then :meth:`evicted` if it closed."""
        victims = []
        for evict in list(self._unanswerable):
            address = self._waiting[evict]
            self.settle(evict)
            victims.append((evict, Admission.ADMIT, address))
        return victims

    def evicted(self, evict: Evict, admission: Admission, address: str | None) -> None:
        """The socket :meth:`victim` named was closed: its slot is free now, and its own
        :meth:`release`, when its connection is lost, changes nothing."""
        self.release(admission, address)
        self._gone.add(evict)

    def release(self, admission: Admission, address: str | None = None, evict: Evict | None = None) -> None:
        """The socket taken with ``admission`` from ``address`` (and ``evict``) is gone."""
        if evict is not None:
            if evict in self._gone:
                self._gone.discard(evict)
                return
            self.settle(evict)
        if admission is Admission.ADMIT:
            self.admitted -= 1
            if self.per_address is not None and address is not None:
                left = self.by_address.pop(address, 1) - 1
                if left > 0:
                    self.by_address[address] = left
        elif admission is not Admission.DROP:
            self.refusing -= 1


def host_of(peer: object) -> str | None:
    """What ``max_connections_per_address`` and the log shares count a socket's peer address
    (``getpeername()``, an ASGI ``client``) as: its host, or for an IPv6 host the /64 network
    it is in (one site's usual allocation, from which a client could otherwise take a fresh
    address for each connection); ``None`` when there is none (a Unix socket). Once a request
    is read, :meth:`Endpoint.client_address` says who it is from behind a trusted proxy."""
    if isinstance(peer, tuple | list) and peer:
        return address_key(str(peer[0]))
    return None


#: The client address a connection from a trusted proxy is counted under for
#: ``max_connections_per_address`` (set by ``Endpoint.authenticate``, read by ``serve``, which
#: runs in the context the handshake left); ``None``: counted by its socket.
_forwarded_slot: contextvars.ContextVar[str | None] = contextvars.ContextVar("dara_ws_forwarded", default=None)


#: Seconds a refused client is asked to wait before it tries again (``Retry-After``).
RETRY_AFTER = 5
#: The answer to a handshake refused for now: the process is full, or shutting down
#: (``EndpointClosed``).
UNAVAILABLE = Refusal(503, "Service Unavailable", (("Retry-After", str(RETRY_AFTER)),))


class Endpoint:
    """Binds a manager and an authenticator into something a transport adapter can serve.

    ``path`` is the URL path the adapters serve, starting with ``/``; a request target names it
    when their paths are equal once normalized (:func:`~dara_ws_core.upgrade.check_target`).
    Raises ``TypeError`` for a manager that is not a :class:`WebsocketManager` or an
    authenticator that is not callable, ``ValueError`` for a path without its leading ``/``, or
    one no request target could name (a ``?``, a ``#``, a malformed percent-encoding, a space).

    An endpoint is one server's: leaving any adapter's ``serve()`` or lifespan shuts it down,
    closing every connection it serves whatever transport took them. To serve one application
    on two transports or paths at once, build an endpoint for each over the same manager.
    """

    def __init__(
        self,
        manager: WebsocketManager,
        authenticator: Authenticator,
        *,
        path: str = DEFAULT_PATH,
    ) -> None:
        # Checked here: each mistake otherwise surfaces later as something else (an
        # AttributeError, every handshake refused with a traceback, an unparseable URL).
        if not isinstance(manager, WebsocketManager):
            raise TypeError(f"Endpoint's manager must be a WebsocketManager, not {type(manager).__name__}")
        if not callable(authenticator):
            raise TypeError("Endpoint's authenticator must be a callable, e.g. allow_anonymous() or "
                            f"token_authenticator(verify), not {type(authenticator).__name__}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"Endpoint's path must start with '/', e.g. {DEFAULT_PATH!r}, not {path!r}")
        if isinstance(read := read_target(path), Refusal) or "?" in path:
            # Every request would get 404 (or 400): the mistake would show as a server that
            # serves nothing.
            detail = read.detail if isinstance(read, Refusal) else "a query is no part of a path"
            raise ValueError(f"Endpoint's path must be a URL path, not {path!r}: {detail}")
        self.manager = manager
        self.authenticator = authenticator
        self.path = path
        self._connections: dict[str, asyncio.Task[Any]] = {}
        #: The on_disconnect tasks of its connections that ended, still running.
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._shutting_down = 0  # shutdown() calls running
        self._told_closed = False  # a refusal after shutdown() logged (once per shutdown)
        config = manager.config
        self.slots = ConnectionSlots(config.max_connections, config.max_connections_per_address)
        allowed = config.forwarded_allow_ips
        #: Whose ``X-Forwarded-For`` names the client (``ServerConfig.forwarded_allow_ips``).
        self.proxies = TrustedProxies(allowed) if allowed else None
        #: Connections served from a trusted proxy, by the client address they are counted
        #: under (only while ``max_connections_per_address`` is set).
        self._forwarded: dict[str, int] = {}

    @property
    def config(self) -> ServerConfig:
        return self.manager.config

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def closed(self) -> bool:
        """Whether it is shut down (or shutting down), refusing handshakes until opened again."""
        return self._closing

    def __repr__(self) -> str:
        count = len(self._connections)
        state = "shutting down" if self._shutting_down else "shut down" if self._closing else "open"
        return f"<Endpoint {self.path} {state}, {count} connection{'' if count == 1 else 's'}>"

    def take_slot(self, address: str | None = None, evict: Evict | None = None, *,
                  answerable: bool = True) -> Admission:
        """Call when a socket is accepted (or, where the library tells nothing earlier, when its
        handshake starts), with its peer's host (:func:`host_of`), and :meth:`free_slot` with
        the result, the same host and ``evict`` when it is gone: whether
        ``ServerConfig.max_connections`` and ``max_connections_per_address`` let it in. A
        refusal is counted in ``handshakes_rejected`` (``full`` or ``address``) and logged
        within the peers' log budget. ``REFUSE`` and ``REFUSE_ADDRESS``: answer the handshake
        503 with ``Retry-After: RETRY_AFTER`` (no authenticator runs); ``DROP``: close the
        socket at once.

        ``evict`` (see :data:`Evict`) registers the socket as still in its handshake until
        :meth:`settled`: when the process or the address is full, such a socket is closed to
        let the newcomer in (counted as ``evicted``; :class:`ConnectionSlots` says which)
        rather than the newcomer refused.

        A socket no answer can reach yet (a TLS one, counted from its TCP accept, before its
        TLS handshake: :mod:`dara_ws_core.tls`) is taken with ``answerable=False``: refused, it
        is ``DROP``, never ``REFUSE``."""
        address = self._slot_key(address)
        slots = self.slots
        for _ in range(slots.waiting):  # each turn takes one socket off the waiting ones
            victim = slots.victim(address, answerable=answerable)
            if victim is None:
                break
            if victim[0]():
                slots.evicted(*victim)
                self.manager.counters.count(self.manager.counters.handshakes_rejected, "evicted")
                break
        admission = slots.take(address, evict, answerable=answerable)
        if admission is not Admission.ADMIT:
            self.refused(admission)
        return admission

    def settled(self, evict: Evict) -> None:
        """The socket registered under ``evict`` (:meth:`take_slot`) has sent its whole request:
        from now on it keeps its slot until it is gone."""
        self.slots.settle(evict)

    def free_slot(self, admission: Admission, address: str | None = None, evict: Evict | None = None) -> None:
        """The socket that :meth:`take_slot` let in (or refused) is gone."""
        self.slots.release(admission, self._slot_key(address), evict)

    def _slot_key(self, address: str | None) -> str | None:
        """What a socket from ``address`` is counted under before its request is read: a
        trusted proxy's under none (its clients are counted each by its own address once their
        request is read, :meth:`authenticate`), every other peer under its own."""
        proxies = self.proxies
        if proxies is not None and self.slots.per_address is not None and proxies.trusts(address):
            return None
        return address

    def receiving_charge(self, identity: Identity | None, host: str | None) -> ReceivingCharge:
        """What an accepted connection's messages in progress count against
        (``max_receiving_total_bytes``): under its holder (its user; for an anonymous one, its
        client's address) and its client's address, as :meth:`authenticate` found it (behind
        a trusted proxy, the client the proxy names, as the chunk and thread shares count it;
        its socket peer's ``host`` where it found none). Call it after :meth:`authenticate`,
        in its context."""
        source = current_source.get()
        return ReceivingCharge(self.config.max_receiving_total_bytes,
                               holder_of(identity, host if source is None else source), address=source)

    def client_address(self, request: HandshakeRequest) -> str | None:
        """Whom the bounds counted per address count ``request`` as, once it is read: its
        socket peer's host, or behind a trusted proxy (``ServerConfig.forwarded_allow_ips``)
        the client its ``X-Forwarded-For`` names; an IPv6 one by its /64 (:func:`host_of`)."""
        host = None if request.remote is None else request.remote[0]
        proxies = self.proxies
        if proxies is not None:
            host = proxies.client_host(host, request.headers.get("x-forwarded-for"))
        return None if host is None else address_key(host)

    def refused(self, admission: Admission) -> None:
        """Count and log a socket refused with ``admission``: :meth:`take_slot` does; an
        adapter that refuses on ``slots.check()`` before any slot is taken calls it itself."""
        counters = self.manager.counters
        if admission is Admission.REFUSE_ADDRESS or (
                admission is Admission.DROP and not self.slots.limit_reached):
            counters.count(counters.handshakes_rejected, "address")
            _FULL_LOG.peer_error(logging.WARNING, "handshake refused: the address has "
                                 "max_connections_per_address connections")
        else:
            counters.count(counters.handshakes_rejected, "full")
            _FULL_LOG.peer_error(logging.WARNING, "handshake refused: %d connections, the "
                                 "max_connections bound", self.slots.admitted)

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Run the authenticator on a handshake. Call it **before** accepting.

        Raises ``AuthenticationFailed``, which the adapter answers with HTTP 403. An authenticator
        that crashes also rejects (and is logged): a bug never lets anyone in. Once the endpoint
        is shut down (also while the authenticator ran), raises its subclass ``EndpointClosed``,
        which the adapter answers with 503 and ``Retry-After`` (:data:`UNAVAILABLE`).
        """
        # The address every share counted per address charges this connection to (the peers'
        # log budget, the anonymous ones' chunk, thread, outbox and spool shares): its tasks
        # (the handshake's, the connection's, its handlers') inherit the context.
        source = self.client_address(request)
        current_source.set(source)
        counters = self.manager.counters
        self._check_open(request)
        # Bounded like the rest of the handshake: an authenticator waiting on a stuck identity
        # provider must not hold the socket (and the peer's slot) for ever. Half the bound, so
        # that it answers 403 before the transport's own handshake bound drops the socket.
        scope = asyncio.timeout(self.config.handshake_timeout / 2)
        try:
            async with scope:
                identity = await run_authenticator(self.authenticator, request)
        except TimeoutError as exc:
            if not scope.expired():  # its own (its identity provider's client gave up): a failure
                raise self._authenticator_failed(request, exc) from exc
            counters.count(counters.handshakes_rejected, "timeout")
            # The application's failures, which a peer may hit with every handshake: the first
            # of each always written, then within the budget of application failures.
            _handshake_log(request).app_error(
                logging.WARNING, "handshake rejected: the authenticator took over %.3g s",
                _AUTHENTICATOR_TIMEOUT, self.config.handshake_timeout / 2)
            raise AuthenticationFailed("authenticator timed out") from exc
        except AuthenticationFailed as exc:
            counters.count(counters.handshakes_rejected, "auth")
            _handshake_log(request).info("handshake rejected: %s", exc)
            raise
        except Exception as exc:
            raise self._authenticator_failed(request, exc) from exc
        if identity.address is not None:  # the authenticator knows better
            current_source.set(source := address_key(identity.address))
        self._check_forwarded(request, source)
        limit = self.config.max_connections_per_user
        if limit is not None and await self._user_connections(identity.user_id) >= limit:
            counters.count(counters.handshakes_rejected, "limit")
            _handshake_log(request, identity).info("handshake rejected: connection limit")
            raise AuthenticationFailed(f"user has {limit} connections already")
        # Shut down while the authenticator ran: no connection may start after the shutdown.
        self._check_open(request)
        counters.handshakes_accepted += 1
        return identity

    def _check_open(self, request: HandshakeRequest) -> None:
        """``EndpointClosed`` (counted; HTTP 503) once the endpoint is shut down."""
        if not self._closing:
            return
        counters = self.manager.counters
        counters.count(counters.handshakes_rejected, "shutdown")
        if not self._told_closed:
            self._told_closed = True
            logger.info("handshake refused: the endpoint is shut down (an adapter's serve() or "
                        "lifespan opens it again)", extra={"path": request.path})
        raise EndpointClosed("the endpoint is shut down: its serve() or lifespan ended (serving it "
                             "again, or Endpoint.open(), takes handshakes again)")

    def _authenticator_failed(self, request: HandshakeRequest, exc: Exception) -> AuthenticationFailed:
        """Count and log an authenticator that raised (in its ``except``: the traceback is
        logged); the refusal to raise."""
        self.manager.counters.count(self.manager.counters.handshakes_rejected, "error")
        _handshake_log(request).app_error(logging.ERROR, "authenticator failed",
                                          (_AUTHENTICATOR, type(exc).__name__), exc_info=True)
        return AuthenticationFailed("authenticator error")

    def _check_forwarded(self, request: HandshakeRequest, source: str | None) -> None:
        """A request from a trusted proxy, its socket counted under no address: refuse it if
        its client has ``max_connections_per_address`` connections (exact in :meth:`serve`)."""
        per_address = self.slots.per_address
        peer = None if request.remote is None else host_of(request.remote)
        if per_address is None or source is None or self._slot_key(peer) is not None:
            _forwarded_slot.set(None)
            return
        _forwarded_slot.set(source)
        if self._forwarded.get(source, 0) >= per_address:
            self.manager.counters.count(self.manager.counters.handshakes_rejected, "address")
            _FULL_LOG.peer_error(logging.WARNING, "handshake refused: the address has "
                                 "max_connections_per_address connections")
            raise AuthenticationFailed(f"address has {per_address} connections already")

    async def _user_connections(self, user_id: str) -> int:
        """The user's connections on every process (on this one if the bus is unreachable)."""
        try:
            return len(await self.manager.get_all_user_channels(user_id))
        except BackplaneError:
            return len(self.manager.get_user_channels(user_id))

    async def serve(self, transport: Transport, identity: Identity) -> None:
        """Run one accepted connection until it ends; closes the transport itself.

        Never raises for anything the peer does; returns when the connection is over and every
        trace of it is gone from the manager.
        """
        limit = self.config.max_connections_per_user
        if limit is not None and len(self.manager.get_user_channels(identity.user_id)) >= limit:
            # Handshakes of one user that ran concurrently all passed the check in authenticate();
            # only here, with no await before the channel is registered, is the count exact.
            await self._refuse(transport, identity, "connection limit")
            return
        forwarded = _forwarded_slot.get()
        if forwarded is not None and not self._take_forwarded(forwarded):
            # Handshakes of one client behind a proxy that ran concurrently all passed the
            # check in authenticate(); here the count is exact.
            await self._refuse(transport, identity, "max_connections_per_address")
            return
        try:  # one coroutine, not one calling another: an idle connection's frames are few
            channel_id = str(uuid.uuid4())
            if not await self.manager.admit(channel_id, identity):
                # With a backplane: the user's connections on every process, counted atomically in
                # the bus (two processes admitting the same user at once cannot both pass).
                logger.info("connection refused: cluster connection limit",
                            extra={"user": identity.user_id})
                await close_quietly(transport, CloseCode.POLICY_VIOLATION, "too many connections")
                return
            if self._closing:
                # The shutdown began after its handshake was accepted, and has closed (or is
                # closing) every connection it found: this one would be served after it.
                self.manager.abandon(channel_id, identity)
                self.manager.counters.count(self.manager.counters.close_codes, CloseCode.GOING_AWAY)
                await close_quietly(transport, CloseCode.GOING_AWAY, "server shutting down")
                return
            try:
                driver = ConnectionDriver(self.manager, transport, identity, channel_id)
            finally:
                self.manager.abandon(channel_id, identity)  # releases it only if no handler was made
            this = asyncio.current_task()
            if this is not None:
                self._connections[channel_id] = this
            self._ensure_sweeper()
            try:
                await driver.run()
            finally:
                self._connections.pop(channel_id, None)
                self._track_hooks(channel_id)
        finally:
            if forwarded is not None:
                left = self._forwarded.pop(forwarded, 1) - 1
                if left > 0:
                    self._forwarded[forwarded] = left

    def _track_hooks(self, channel_id: str) -> None:
        """Keep the ``on_disconnect`` task of a connection of this endpoint's that ended (its
        manager's hooks started it as the channel was removed), for :meth:`shutdown`."""
        hooks = self.manager.hooks
        task = None if hooks is None else hooks.tasks.get(channel_id)
        if task is not None and not task.done():
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    def _take_forwarded(self, client: str) -> bool:
        """Count a connection of ``client`` behind a trusted proxy, if its address has room."""
        held, limit = self._forwarded.get(client, 0), self.slots.per_address
        if limit is not None and held >= limit:
            return False
        self._forwarded[client] = held + 1
        return True

    async def _refuse(self, transport: Transport, identity: Identity, why: str) -> None:
        logger.info("connection refused: %s", why, extra={"user": identity.user_id})
        self.manager.counters.count(self.manager.counters.close_codes, CloseCode.POLICY_VIOLATION)
        await close_quietly(transport, CloseCode.POLICY_VIOLATION, "too many connections")

    # ------------------------------------------------------------------ timers and shutdown

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Check every connection's timers (idle timeout, identity expiry: the connection
        decides) once per interval, so an idle connection costs no timer of its own."""
        idle = self.config.idle_timeout
        interval = min(1.0, idle / 4) if idle else 1.0
        loop = asyncio.get_running_loop()
        while self._connections:
            await asyncio.sleep(interval)
            now, wall = loop.time(), time.time()
            for handler in list(self.manager.handlers.values()):
                if handler.channel_id in self._connections:
                    handler.tick(now, wall)

    def open(self) -> None:
        """Accept handshakes again after :meth:`shutdown`: each adapter's ``serve()`` and ASGI
        lifespan call it as they start, so that one endpoint (a module's, say) can be served
        again, by the next test or a restarted server. A no-op on an endpoint never shut down.
        Raises ``RuntimeError`` while a :meth:`shutdown` runs: the connections it is closing,
        and newcomers it would not wait for, would be served side by side."""
        if self._shutting_down:
            raise RuntimeError(f"{self!r} cannot be opened while its shutdown() runs: await it first")
        self._closing = False
        self._told_closed = False

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop: refuse new handshakes, close every socket still in its TLS handshake (counted
        from its accept, :mod:`dara_ws_core.tls`: once listening has stopped, none could be
        served), close every connection with 1001 and fail their pending requests, and wait
        until every connection task is done.

        A connection with handler tasks running (custom requests in flight) is closed when they
        end or when ``grace`` seconds (default ``ServerConfig.shutdown_grace``) have passed,
        whichever is first; its replies queued by then are sent before the close frame. Other
        connections are closed at once. Then it waits for its connections'
        :meth:`~WebsocketManager.on_disconnect` hooks, up to ``grace`` (at least a second), and
        cancels those still running (another endpoint's over the same manager are left alone). Idempotent."""
        self._closing = True
        self._shutting_down += 1
        try:
            await self._shut_down(grace)
        finally:
            self._shutting_down -= 1

    async def _shut_down(self, grace: float | None) -> None:
        counters = self.manager.counters
        # Listening has stopped: a socket still in its TLS handshake could only be refused once
        # it is done (up to handshake_timeout later, when the shutdown is over).
        for victim in self.slots.unanswerable():
            if victim[0]():
                self.slots.evicted(*victim)
                counters.count(counters.handshakes_rejected, "shutdown")
        grace = self.config.shutdown_grace if grace is None else grace
        handlers = [h for c, h in self.manager.handlers.items() if c in self._connections]

        async def close_when_done(handler: WebSocketHandler) -> None:
            if grace > 0:
                await handler.wait_tasks(grace)
            handler.close(CloseCode.GOING_AWAY, "server shutting down")

        if handlers:
            await asyncio.gather(*(close_when_done(h) for h in handlers))
        tasks = list(self._connections.values())
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=max(grace, 1.0) + 5.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5.0)
        # Its ended connections' on_disconnect hooks, none left pending (another endpoint's
        # over the same manager are its own shutdown's).
        await ConnectionHooks.wait(self._hook_tasks, max(grace, 1.0))
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        telemetry = self.manager.counters.telemetry
        if telemetry is not None:  # the sampled operations' deferred SDK work, before the loop ends
            telemetry.flush()
        self.manager.custom_handlers.threads.shutdown()  # the in_thread handlers' pool


#: The authenticator's failures, as application failures (``ConnectionLogger.app_error``), keyed
#: apart from the handlers' kinds.
_AUTHENTICATOR = "<authenticator>"
_AUTHENTICATOR_TIMEOUT = (_AUTHENTICATOR, "timeout")


#: Refusals for a full process, written as one connection's peer records: the first ten, then
#: every power of ten, with the count.
_FULL_LOG = ConnectionLogger(logger, {"path": None, "user": None})


def _handshake_log(request: HandshakeRequest, identity: Identity | None = None) -> ConnectionLogger:
    """A logger for a handshake's records: ``path`` and ``user`` (once known); there is no
    channel yet. Made only when something is logged."""
    return ConnectionLogger(
        logger, {"path": request.path, "user": None if identity is None else identity.user_id})


async def ws_handler(endpoint: Endpoint, transport: Transport, request: HandshakeRequest) -> bool:
    """Authenticate and serve in one call, for transports whose accept step the caller controls
    elsewhere. Returns ``False`` (after closing with 1008) when authentication fails.

    Adapters that can answer HTTP 403 before accepting should call ``authenticate`` and ``serve``
    separately instead.
    """
    try:
        identity = await endpoint.authenticate(request)
    except AuthenticationFailed:
        await close_quietly(transport, CloseCode.POLICY_VIOLATION, "forbidden")
        return False
    await endpoint.serve(transport, identity)
    return True
