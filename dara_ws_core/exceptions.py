"""Exceptions raised by dara-ws-core.

Every exception derives from :class:`DaraWSError`. The tree separates *our own misuse*
(a bug in the calling application) from *a bad peer* (the remote side broke the protocol)
and from *the connection going away*::

    DaraWSError
    ├── ConnectionClosed            the connection closed; carries the close code and reason
    ├── RequestError                a server -> client request (send_and_wait) did not complete
    │   ├── RequestTimeout          its timeout passed (also a builtin TimeoutError)
    │   └── TooManyPendingRequests  the channel already has the configured maximum in flight
    ├── ProtocolError               the peer broke the protocol; carries the close code to use
    │   ├── InvalidFrame            binary frame (1003), not JSON / not an object (1007)
    │   ├── FrameTooLarge           a frame over the configured maximum (1009)
    │   ├── InvalidMessage          a JSON object of unknown type or invalid fields; dropped
    │   └── ChunkError              an invalid chunk sequence; fails that request only
    ├── SlowConsumer                a channel's outbound queue is full (policy ``disconnect``: 1013)
    ├── AuthenticationFailed        the handshake is rejected with HTTP 403, before accept
    │   └── EndpointClosed          the endpoint's shutdown overtook it: HTTP 503, Retry-After
    ├── UnknownChannel              no connection with that channel id (also a LookupError)
    ├── UnknownKind                 no custom handler registered for a kind (also a LookupError)
    ├── RemoteError                 the other side answered a request with an error reply
    └── BackplaneError              the cross-process backplane failed (see ``backplane``)
        └── RevocationNotKept       a revocation could neither be published nor spooled

Builtins are never shadowed: :class:`RequestTimeout` *inherits* from :class:`TimeoutError` so
``except TimeoutError`` keeps working, but has its own name.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BackplaneError",
    "ChunkError",
    "CloseCode",
    "ConnectionClosed",
    "DaraWSError",
    "EndpointClosed",
    "FrameTooLarge",
    "InvalidFrame",
    "InvalidMessage",
    "ProtocolError",
    "RemoteError",
    "RequestError",
    "RequestTimeout",
    "RevocationNotKept",
    "SlowConsumer",
    "TooManyPendingRequests",
    "UnknownChannel",
    "UnknownKind",
]

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes used by this library (RFC 6455 section 7.4.1, protocol.md section 6)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class DaraWSError(Exception):
    """Root of every exception raised by dara-ws-core."""


class ConnectionClosed(DaraWSError):
    """The connection is closed (or closing); nothing more can be sent or received on it.

    Pending ``send_and_wait`` calls of a closed channel fail with this exception at once.
    """

    def __init__(self, code: int = CloseCode.ABNORMAL, reason: str = "") -> None:
        self.code = int(code)
        self.reason = reason
        super().__init__(f"connection closed (code {self.code}{': ' + reason if reason else ''})")


class RequestError(DaraWSError):
    """A server -> client request did not complete."""


class RequestTimeout(RequestError, TimeoutError):
    """A request's timeout passed before its answer arrived."""


class TooManyPendingRequests(RequestError):
    """The channel already has ``max_pending_requests`` requests in flight."""


class ProtocolError(DaraWSError):
    """The peer sent something the protocol forbids.

    ``close_code`` is the code to close the connection with, or ``None`` when the error only
    fails one request (chunk errors) and the connection stays open.
    """

    close_code: int | None = CloseCode.PROTOCOL_ERROR

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        if close_code is not None:
            self.close_code = close_code


class InvalidFrame(ProtocolError):
    """A frame that is binary (1003), not JSON, or not a JSON object (1007)."""

    close_code = CloseCode.INVALID_PAYLOAD


class FrameTooLarge(ProtocolError):
    """A frame larger than the configured maximum (1009)."""

    close_code = CloseCode.MESSAGE_TOO_BIG


class InvalidMessage(ProtocolError):
    """A JSON object with an unknown ``type`` or invalid fields: dropped and logged, the connection
    stays open (protocol.md section 6)."""

    close_code = None


class ChunkError(ProtocolError):
    """An invalid chunk sequence; fails the request it belongs to, the connection stays open."""

    close_code = None


class SlowConsumer(DaraWSError):
    """A channel's outbound queue is full and its policy refuses to wait."""


class AuthenticationFailed(DaraWSError):
    """Raised by an authenticator to reject a handshake (HTTP 403, before accept).

    The reason is logged, never sent to the client.
    """


class EndpointClosed(AuthenticationFailed):
    """Raised by :meth:`Endpoint.authenticate` for a handshake that came (or was still being
    authenticated) once the endpoint was shut down. The server is going away, not refusing the
    client: adapters answer HTTP 503 with ``Retry-After``, so that a client tries again (another
    process, or this one restarted) rather than take it for a refused identity. An adapter that
    does not know it answers 403, as for any ``AuthenticationFailed``.
    """


class UnknownChannel(DaraWSError, LookupError):
    """No connection is registered under that channel id (here or, with a backplane, anywhere)."""

    def __init__(self, channel_id: str) -> None:
        self.channel_id = channel_id
        super().__init__(f"no connection for channel {channel_id!r}")


class UnknownKind(DaraWSError, LookupError):
    """No custom handler is registered for that kind."""


class RemoteError(DaraWSError):
    """The other side answered a request with an error reply (protocol.md section 3, [ext])."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class BackplaneError(DaraWSError):
    """The cross-process backplane could not deliver or look something up."""


class RevocationNotKept(BackplaneError):
    """A revocation (``disconnect_*_everywhere``, ``close_channel_everywhere``) was neither
    published nor kept in the backplane's spool: the bus is down or refused it, and the spool's
    room for revocations holds as many other targets as it may, or the backplane stopped. The
    other processes will not close the target's connections: revoke it again once the bus takes
    it.
    Logged at ERROR with its target. (A plain :class:`BackplaneError` from those calls means the
    revocation waits in the spool and is published once the bus answers.)"""
