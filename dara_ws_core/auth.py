"""Handshake authentication (protocol.md section 5).

An *authenticator* is any callable ``(HandshakeRequest) -> Identity`` (sync or async) that raises
:class:`~dara_ws_core.exceptions.AuthenticationFailed` to reject the handshake. Adapters call it
**before** accepting, so a rejected client gets HTTP 403 and nothing is created for it.

Building blocks:

* :func:`token_authenticator` reads a token where Dara clients put it (the ``dara_session_token``
  cookie of Dara 1.30, the ``token`` query parameter of older Dara, or ``Authorization: Bearer``)
  and hands it to your ``verify`` function.
* :func:`allow_anonymous` accepts everyone as a fresh anonymous identity. It is never the default:
  anonymous access is an explicit choice of the application.
* :func:`check_origin` wraps an authenticator with an ``Origin`` allow-list against cross-site
  WebSocket hijacking.
"""

from __future__ import annotations

__all__ = [
    "SESSION_COOKIE",
    "AnonymousIdentity",
    "Authenticator",
    "Holder",
    "Identity",
    "allow_anonymous",
    "check_origin",
    "extract_token",
    "holder_of",
    "run_authenticator",
    "token_authenticator",
]

import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from .exceptions import AuthenticationFailed
from .transport import HandshakeRequest

#: The cookie Dara 1.30 sets at login and its websocket handler reads.
SESSION_COOKIE = "dara_session_token"


#: The claims of an identity that has none: read-only, so every such identity shares it (one
#: empty dict and proxy less per connection).
_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end of a connection.

    ``user_id`` keys per-user fan-out; ``session_id`` groups the tabs of one login (Dara keeps
    channel -> session -> user). ``expires_at`` (a ``time.time()`` value) makes the server close the
    connection when the identity expires, instead of checking only at the handshake.
    An :class:`AnonymousIdentity` (``anonymous``) names no one: the bounds a user's connections
    share are shared by the anonymous connections of one address instead (see :func:`holder_of`).
    ``address``, when an authenticator sets it, is the client's address as it knows it (read
    from a header its proxy sets, for one): every bound counted per address once the handshake
    is read counts the connection by it, in place of the address the endpoint found
    (``Endpoint.client_address``: the socket's peer, or the client a trusted proxy names);
    ``max_connections_per_address`` too when the socket's peer is a trusted proxy (a socket
    from anyone else was counted by its peer as it connected).
    """

    #: Whether the identity names nobody in particular (:class:`AnonymousIdentity`).
    anonymous: ClassVar[bool] = False

    user_id: str
    session_id: str
    token: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _NO_CLAIMS)
    expires_at: float | None = None
    address: str | None = None

    def expired(self, now: float | None = None) -> bool:
        """Whether ``expires_at`` has passed."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at


#: Who a connection's share of a per-user bound is charged to (:func:`holder_of`): a user id, or
#: ``("address", host)`` for the anonymous connections of one address (a tuple: no user id, whatever
#: text a client may name itself with, can take an address's share).
Holder = str | tuple[str, str]


def holder_of(identity: Identity | None, source: str | None) -> Holder | None:
    """Who shares bounds with a connection of ``identity`` whose peer is ``source`` (its address
    key, :func:`~dara_ws_core.endpoint.host_of`): the user's connections together; for an
    anonymous identity (or none), every anonymous connection of the same address, which a peer
    cannot vary for free the way it gets a fresh anonymous identity with each connection. Without
    an address (a Unix socket, a test), an anonymous connection is its own holder (its
    ``user_id``, or ``None``: the channel alone)."""
    if identity is not None and not identity.anonymous:
        return identity.user_id
    if source is not None:
        return ("address", source)
    return None if identity is None else identity.user_id


@dataclass(frozen=True, slots=True)
class AnonymousIdentity(Identity):
    """An identity that names nobody in particular, as :func:`allow_anonymous` gives (its user
    id is new for each connection): what its connections cost a bound the server shares (the
    outbox's per-sender share) is charged to their address, not to their user id, which a client
    could otherwise change for free by reconnecting. An authenticator of guests returns one."""

    anonymous: ClassVar[bool] = True


Authenticator = Callable[[HandshakeRequest], "Identity | Awaitable[Identity]"]


async def run_authenticator(authenticator: Authenticator, request: HandshakeRequest) -> Identity:
    """Call a sync or async authenticator and check that it returned an :class:`Identity`."""
    result = authenticator(request)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, Identity):
        raise TypeError(f"authenticator returned {type(result).__name__}, expected Identity")
    return result


def extract_token(
    request: HandshakeRequest,
    *,
    cookie: str | None = SESSION_COOKIE,
    query: str | None = "token",
    header: bool = True,
) -> str | None:
    """Find a token in the handshake: cookie first (Dara 1.30), then query (older Dara), then header."""
    if cookie and (value := request.cookies.get(cookie)):
        return value
    if query and (value := request.query.get(query)):
        return value
    if header:
        auth = request.headers.get("authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def token_authenticator(
    verify: Callable[[str], Identity | Awaitable[Identity]],
    *,
    cookie: str | None = SESSION_COOKIE,
    query: str | None = "token",
    header: bool = True,
) -> Authenticator:
    """An authenticator that extracts a token and verifies it with ``verify(token) -> Identity``.

    A missing token is rejected. ``verify`` rejects by raising ``AuthenticationFailed``; any other
    exception it raises is also turned into a rejection (and logged by the endpoint), so a broken
    verifier never lets anyone in.
    """

    async def authenticate(request: HandshakeRequest) -> Identity:
        token = extract_token(request, cookie=cookie, query=query, header=header)
        if token is None:
            raise AuthenticationFailed("no token in cookie, query or Authorization header")
        try:
            result = verify(token)
            if inspect.isawaitable(result):
                result = await result
        except AuthenticationFailed:
            raise
        except Exception as exc:
            raise AuthenticationFailed(f"token verification failed: {type(exc).__name__}") from exc
        return result

    return authenticate


def allow_anonymous() -> Authenticator:
    """Accept every handshake as a new :class:`AnonymousIdentity` (one user and session per
    connection)."""

    def authenticate(request: HandshakeRequest) -> Identity:
        anon = f"anonymous-{uuid.uuid4()}"
        return AnonymousIdentity(user_id=anon, session_id=anon)

    return authenticate


def check_origin(
    authenticator: Authenticator, allowed: Collection[str], *, allow_missing: bool = True
) -> Authenticator:
    """Reject handshakes whose ``Origin`` is not in ``allowed`` before running ``authenticator``.

    Browsers always send ``Origin``; non-browser clients (services, tests) usually do not, which
    ``allow_missing`` permits. Origins compare exactly (scheme, host and port), case-insensitively.
    """
    allowed_set = frozenset(o.lower().rstrip("/") for o in allowed)

    async def authenticate(request: HandshakeRequest) -> Identity:
        origin = request.origin
        if origin is None:
            if not allow_missing:
                raise AuthenticationFailed("missing Origin header")
        elif origin.lower().rstrip("/") not in allowed_set:
            raise AuthenticationFailed(f"origin {origin!r} is not allowed")
        return await run_authenticator(authenticator, request)

    return authenticate
