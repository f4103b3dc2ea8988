"""A JWT authenticator (protocol.md section 5), on PyJWT: ``pip install dara-ws-core[jwt]``.

:func:`jwt_authenticator` builds an :class:`~dara_ws_core.auth.Authenticator` that reads the token
where Dara clients put it (through :func:`~dara_ws_core.auth.token_authenticator`: the
``dara_session_token`` cookie, the ``token`` query parameter, ``Authorization: Bearer``), verifies
its signature against an algorithm allow-list, checks ``exp`` / ``nbf`` / ``iat`` and, when asked,
``aud`` and ``iss``, and turns the claims into an :class:`~dara_ws_core.auth.Identity`::

    from dara_ws_core.jwt import jwt_authenticator

    endpoint = Endpoint(manager, jwt_authenticator(SECRET, audience="dara", issuer="https://idp"))

The identity's ``expires_at`` is the token's ``exp`` (plus ``leeway``), so the endpoint closes the
live connection with 1008 when the token expires instead of trusting it forever after the
handshake. Every failure is an ``AuthenticationFailed`` (HTTP 403 before accept); its reason is
logged, never sent to the client.

PyJWT is imported when :func:`jwt_authenticator` is called, never when this module is imported:
the core depends on no optional library at import time.
"""

from __future__ import annotations

__all__ = ["jwt_authenticator"]

import hashlib
import math
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any

from .auth import SESSION_COOKIE, Authenticator, Identity, token_authenticator
from .exceptions import AuthenticationFailed

#: HMAC algorithms share one secret between issuer and verifier; the others verify with a public
#: key. An allow-list holding both kinds invites algorithm confusion (a public key used as an HMAC
#: secret), so it is refused.
_SYMMETRIC = frozenset({"HS256", "HS384", "HS512"})
#: Registered claims that RFC 7519 makes NumericDates.
_NUMERIC_DATES = ("exp", "nbf", "iat")

#: ``key`` may be a callable that picks the verification key from the token's unverified header
#: (key rotation by ``kid``); it raises ``AuthenticationFailed`` or ``LookupError`` for an unknown
#: key.
KeyResolver = Callable[[Mapping[str, Any]], Any]


def jwt_authenticator(
    key: Any,
    *,
    algorithms: Collection[str] = ("HS256",),
    audience: str | Collection[str] | None = None,
    issuer: str | Collection[str] | None = None,
    leeway: float = 0,
    user_claim: str = "sub",
    session_claim: str | None = "sid",
    require: Collection[str] = ("exp",),
    cookie: str | None = SESSION_COOKIE,
    query: str | None = "token",
    header: bool = True,
) -> Authenticator:
    """An authenticator that accepts only valid JWTs signed with ``key``.

    * ``key``: the HMAC secret, the public key (PEM or a ``cryptography`` key object), or a
      :data:`KeyResolver` given the token's unverified header.
    * ``algorithms``: the allow-list; a token signed with anything else is rejected. ``none`` is
      never allowed, and HMAC and public-key algorithms cannot be mixed.
    * ``audience`` / ``issuer``: when given, the ``aud`` / ``iss`` claim must match (one of) them.
      A token carrying ``aud`` is rejected when no ``audience`` is configured.
    * ``leeway``: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    * ``user_claim``: the claim that names the user (a non-empty string), ``sub`` by default.
    * ``session_claim``: the claim that names the login session; when it is ``None`` or missing
      from a token, the session is derived from the token itself (every tab presenting the same
      token shares one session, which :meth:`WebsocketManager.disconnect_session` then closes).
    * ``require``: claims that must be present (``exp`` by default: a token without expiry would
      authorise a connection forever).
    * ``cookie`` / ``query`` / ``header``: where to look for the token (see ``extract_token``).

    Raises ``ValueError`` for an unsafe configuration or a ``key`` that cannot verify tokens of
    ``algorithms``, ``TypeError`` for ``algorithms`` given as one string, and ``ImportError``
    without PyJWT.
    """
    # The optional dependency (extra [jwt]) is imported on use only.
    try:
        import jwt as pyjwt
        from jwt.algorithms import get_default_algorithms, has_crypto
        from jwt.exceptions import InvalidKeyError
    except ImportError as exc:
        raise ImportError(
            'dara_ws_core.jwt needs the PyJWT library: pip install "dara-ws-core[jwt]"', name=exc.name
        ) from exc

    if isinstance(algorithms, str):  # a name's letters would be the allow-list
        raise TypeError(f"algorithms must be a list of names, e.g. [{algorithms!r}], not a str")
    allowed = tuple(dict.fromkeys(algorithms))
    if not allowed:
        raise ValueError("algorithms must name at least one algorithm")
    if any(alg.lower() == "none" for alg in allowed):
        raise ValueError("the 'none' algorithm is never allowed: tokens must be signed")
    if any(alg in _SYMMETRIC for alg in allowed) and any(alg not in _SYMMETRIC for alg in allowed):
        raise ValueError("algorithms must not mix HMAC (HS*) and public-key algorithms")
    supported = get_default_algorithms()
    unknown = [alg for alg in allowed if alg not in supported]
    if unknown:
        if has_crypto:
            raise ValueError(f"unsupported algorithms {unknown}: PyJWT knows {sorted(supported)}")
        raise ValueError(
            f"unsupported algorithms {unknown}: public-key algorithms need PyJWT's crypto backend,"
            ' pip install "dara-ws-core[jwt]"'
        )
    if not callable(key) and not isinstance(key, pyjwt.PyJWK):  # a PyJWK is prepared already
        # A key that cannot verify (an HMAC secret for RS256, an empty one, a public key given as
        # the HMAC secret) would refuse every token, each handshake's log saying why.
        for alg in allowed:
            try:
                supported[alg].prepare_key(key)
            except (InvalidKeyError, ValueError, TypeError) as exc:
                raise ValueError(f"key cannot verify {alg} tokens: {exc}") from None
    if leeway < 0:
        raise ValueError("leeway must be >= 0")
    required = list(dict.fromkeys(require))
    options: dict[str, Any] = {"require": required, "verify_signature": True}
    audience_arg = audience if audience is None or isinstance(audience, str) else list(audience)
    issuer_arg = issuer if issuer is None or isinstance(issuer, str) else list(issuer)
    resolve: KeyResolver | None = key if callable(key) else None

    def verify(token: str) -> Identity:
        try:
            header_fields = pyjwt.get_unverified_header(token)
            # Checked here as well as by PyJWT: an unsigned or disallowed token never reaches a
            # key resolver, and the log says why it was refused.
            alg = header_fields.get("alg")
            if alg not in allowed:
                raise AuthenticationFailed(f"token algorithm {alg!r} is not allowed")
            try:
                verification_key = key if resolve is None else resolve(header_fields)
            except LookupError as exc:
                raise AuthenticationFailed("no verification key for this token") from exc
            claims: dict[str, Any] = pyjwt.decode(
                token,
                verification_key,
                algorithms=list(allowed),
                audience=audience_arg,
                issuer=issuer_arg,
                leeway=leeway,
                options=options,  # type: ignore[arg-type]
            )
        except pyjwt.PyJWTError as exc:
            raise AuthenticationFailed(f"invalid token: {type(exc).__name__}: {exc}") from None
        return _identity(token, claims)

    def _identity(token: str, claims: dict[str, Any]) -> Identity:
        for name in _NUMERIC_DATES:
            # PyJWT compares int(claim), so "exp": "9999999999" passes its check; RFC 7519
            # section 2 makes these NumericDates (JSON numbers). A string would also escape the
            # expiry enforced on the live connection below.
            value = claims.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise AuthenticationFailed(f"claim {name!r} must be a number")
        user = claims.get(user_claim)
        if not isinstance(user, str) or not user:
            raise AuthenticationFailed(f"claim {user_claim!r} must be a non-empty string")
        session = claims.get(session_claim) if session_claim is not None else None
        if session is None:
            session = "jwt-" + hashlib.sha256(token.encode()).hexdigest()[:32]
        elif not isinstance(session, str) or not session:
            raise AuthenticationFailed(f"claim {session_claim!r} must be a non-empty string")
        exp = claims.get("exp")
        # exp is a finite number (checked above); the connection lives as long as the handshake
        # would have accepted the token.
        expires_at = None if exp is None else float(exp) + leeway
        return Identity(
            user_id=user,
            session_id=session,
            token=token,
            claims=MappingProxyType(claims),
            expires_at=expires_at,
        )

    return token_authenticator(verify, cookie=cookie, query=query, header=header)
