"""Authentication a production deployment can rely on (issue 5, part 3), on every transport.

Every rejection is an HTTP 403 before accept that creates nothing (protocol.md section 5): no
channel, no handler, no registry entry, no connection task. Live identities can be revoked
(``disconnect_user`` / ``disconnect_session``) or expire (``Identity.expires_at``, set from a JWT's
``exp``), which closes the connection with 1008 and fails its pending requests.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from dara_ws_core import (
    AuthenticationFailed,
    CloseCode,
    ConnectionClosed,
    HandshakeRequest,
    Identity,
    ServerConfig,
    allow_anonymous,
    check_origin,
    token_authenticator,
)
from dara_ws_core.auth import holder_of, run_authenticator
from dara_ws_core.jwt import jwt_authenticator

from .helpers import eventually
from .stacks import HandshakeRejected, Stack, verify_token

MakeStack = Callable[..., AbstractAsyncContextManager[Stack]]

SECRET = "s3cret-key-for-tests-" + "x" * 64
OTHER_SECRET = "another-key-for-tests-" + "y" * 64
APP_ORIGIN = "https://app.example.com"


def make_token(claims: dict[str, Any] | None = None, *, key: Any = SECRET,
               algorithm: str = "HS256", **extra: Any) -> str:
    """A signed token for user alice, session s1, valid for an hour unless overridden."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "alice", "sid": "s1", "iat": now, "exp": now + 3600}
    payload.update(claims or {})
    payload.update(extra)
    payload = {k: v for k, v in payload.items() if v is not None}
    return pyjwt.encode(payload, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, for what PyJWT refuses to produce (``none``, algorithm confusion)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, bytes]:
    """(private key, public key PEM)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


def assert_nothing_created(stack: Stack) -> None:
    assert stack.manager.handlers == {}
    assert stack.manager.registry.counts() == (0, 0, 0)
    assert stack.endpoint.connection_count == 0


async def assert_rejected(stack: Stack, token: str | None, **options: Any) -> None:
    with pytest.raises(HandshakeRejected) as info:
        await stack.connect(token, **options)
    assert info.value.status == 403
    assert_nothing_created(stack)


# ----------------------------------------------------------------------------- the JWT module


def test_core_imports_pyjwt_only_when_the_jwt_authenticator_is_built() -> None:
    source = Path(__file__).parents[1] / "dara_ws_core" / "jwt.py"
    tree = ast.parse(source.read_text())
    top_level = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.level)
    }
    assert "jwt" not in top_level


def test_jwt_module_imports_without_pyjwt_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "jwt", None)  # makes ``import jwt`` fail
    monkeypatch.delitem(sys.modules, "dara_ws_core.jwt")
    import dara_ws_core.jwt as module

    with pytest.raises(ImportError):
        module.jwt_authenticator(SECRET)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algorithms": ("none",)}, "none"),
        ({"algorithms": ("HS256", "NONE")}, "none"),
        ({"algorithms": ()}, "at least one"),
        ({"algorithms": ("HS256", "RS256")}, "mix"),
        ({"algorithms": ("XX999",)}, "unsupported"),
        ({"algorithms": ("RS256",)}, "key cannot verify RS256"),  # the HMAC secret as a public key
        ({"leeway": -1}, "leeway"),
    ],
)
def test_jwt_authenticator_refuses_unsafe_configuration(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        jwt_authenticator(SECRET, **options)


def test_jwt_authenticator_refuses_a_key_or_algorithms_that_would_refuse_every_token() -> None:
    """Found at construction, not as a 403 for every client with a reason in the log only."""
    with pytest.raises(ValueError, match="key cannot verify HS256 tokens: HMAC key must not be empty"):
        jwt_authenticator("")
    with pytest.raises(TypeError, match=r"a list of names, e.g. \['HS256'\], not a str"):
        jwt_authenticator(SECRET, algorithms="HS256")


async def test_jwt_identity_carries_user_session_claims_and_expiry() -> None:
    token = make_token(exp=2_000_000_000, role="admin")
    identity = await run_authenticator(
        jwt_authenticator(SECRET, leeway=5), HandshakeRequest.build(f"/api/core/ws?token={token}", [])
    )
    assert (identity.user_id, identity.session_id, identity.token) == ("alice", "s1", token)
    assert identity.claims["role"] == "admin"
    assert identity.expires_at == 2_000_000_005  # exp + leeway: as long as the handshake accepts


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", True, [1], {"n": 1}])
async def test_jwt_numeric_date_claims_that_are_not_numbers_are_refused(
    claim: str, value: Any
) -> None:
    # PyJWT compares int(exp): the string "9999999999" passed, and was never enforced after.
    token = make_token(**{claim: value})
    with pytest.raises(AuthenticationFailed):
        await run_authenticator(
            jwt_authenticator(SECRET), HandshakeRequest.build(f"/?token={token}", [])
        )


async def test_jwt_session_defaults_to_one_per_token_when_the_claim_is_missing() -> None:
    auth = jwt_authenticator(SECRET)
    token_a, token_b = make_token(sid=None, jti="a"), make_token(sid=None, jti="b")
    first = await run_authenticator(auth, HandshakeRequest.build(f"/?token={token_a}", []))
    again = await run_authenticator(auth, HandshakeRequest.build(f"/?token={token_a}", []))
    other = await run_authenticator(auth, HandshakeRequest.build(f"/?token={token_b}", []))
    assert first.session_id == again.session_id != other.session_id
    assert token_a not in first.session_id  # the token itself never becomes an identifier


async def test_jwt_key_resolver_picks_the_key_by_kid() -> None:
    keys = {"k1": SECRET, "k2": OTHER_SECRET}
    auth = jwt_authenticator(lambda header: keys[header.get("kid", "")])
    token = pyjwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, OTHER_SECRET,
                         headers={"kid": "k2"})
    assert (await run_authenticator(auth, HandshakeRequest.build(f"/?token={token}", []))).user_id == "bob"
    unknown = pyjwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, SECRET,
                           headers={"kid": "k9"})
    with pytest.raises(AuthenticationFailed):
        await run_authenticator(auth, HandshakeRequest.build(f"/?token={unknown}", []))


# ----------------------------------------------------------------------------- handshakes


@pytest.mark.parametrize("where", ["query", "cookie", "header"])
async def test_valid_jwt_is_accepted_from_where_dara_clients_put_it(
    make_stack: MakeStack, where: str
) -> None:
    token = make_token()
    async with make_stack(authenticator=jwt_authenticator(SECRET)) as stack:
        if where == "header":
            transport = await stack.connect(None, headers=[("Authorization", f"Bearer {token}")])
        else:
            transport = await stack.connect(token, cookie=where == "cookie")
        assert json.loads(await transport.receive())["type"] == "init"
        handler = next(iter(stack.manager.handlers.values()))
        assert handler.identity is not None
        assert handler.identity.user_id == "alice"
        assert stack.manager.get_user_channels("alice") == {handler.channel_id}
        await transport.close()


def _bad_tokens(public_pem: bytes, private_key: Any) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "alice", "sid": "s1", "exp": now + 3600}
    return {
        "forged (wrong key)": make_token(key=OTHER_SECRET),
        "tampered payload": _tamper(make_token()),
        "expired": make_token(exp=now - 10),
        "not yet valid (nbf)": make_token(nbf=now + 600),
        "issued in the future (iat)": make_token(iat=now + 600),
        "alg none, unsigned": hand_made_token({"alg": "none", "typ": "JWT"}, claims, None),
        "alg None, unsigned": hand_made_token({"alg": "None", "typ": "JWT"}, claims, None),
        "alg none, with HS256 signature": _with_alg(make_token(), "none"),
        "wrong algorithm (HS512)": make_token(algorithm="HS512"),
        "public key used as HMAC secret": hand_made_token(
            {"alg": "HS256", "typ": "JWT"}, claims, public_pem
        ),
        "RS256 where HS256 is allowed": make_token(key=private_key, algorithm="RS256"),
        "no exp": make_token(exp=None),
        "no sub": make_token(sub=None),
        "sub not a string": make_token(sub=42),
        "empty sub": make_token(sub=""),
        "sid not a string": make_token(sid=["s1"]),
        "unexpected audience": make_token(aud="someone-else"),
        "garbage": "not.a.jwt",
        "empty segments": "..",
    }


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


def _with_alg(token: str, alg: str) -> str:
    _, payload, signature = token.split(".")
    return f"{_b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{payload}.{signature}"


async def test_forged_expired_and_wrong_algorithm_tokens_get_403_and_create_nothing(
    make_stack: MakeStack, rsa_keys: tuple[Any, bytes]
) -> None:
    private_key, public_pem = rsa_keys
    async with make_stack(authenticator=jwt_authenticator(SECRET)) as stack:
        for name, token in _bad_tokens(public_pem, private_key).items():
            try:
                await assert_rejected(stack, token)
                await assert_rejected(stack, token, cookie=True)
            except BaseException as exc:
                raise AssertionError(f"token {name!r} was not rejected cleanly") from exc
        await assert_rejected(stack, None)
        # The server is still up and accepts a good token afterwards.
        client = await stack.client(make_token())
        client.on_request(lambda request: "answer")
        reply = await stack.manager.send_and_wait(client.channel or "", {"q": 1}, timeout=5)
        assert reply == "answer"


async def test_rs256_with_a_pyjwk_key(rsa_keys: tuple[Any, bytes]) -> None:
    """A key in any form PyJWT verifies with is taken, a ``PyJWK`` (from a JWKS) included."""
    private_key, _ = rsa_keys
    jwk = pyjwt.PyJWK.from_json(RSAAlgorithm.to_jwk(private_key.public_key()))
    token = make_token(key=private_key, algorithm="RS256")
    request = HandshakeRequest.build(f"/api/core/ws?token={token}", [])
    identity = await run_authenticator(jwt_authenticator(jwk, algorithms=["RS256"]), request)
    assert identity.user_id == "alice"


async def test_rs256_with_audience_and_issuer(
    make_stack: MakeStack, rsa_keys: tuple[Any, bytes]
) -> None:
    private_key, public_pem = rsa_keys
    auth = jwt_authenticator(public_pem, algorithms=("RS256",), audience="dara",
                             issuer=("https://idp.example.com", "https://idp2.example.com"))

    def rs(**claims: Any) -> str:
        base = {"aud": "dara", "iss": "https://idp.example.com"}
        return make_token({**base, **claims}, key=private_key, algorithm="RS256")

    async with make_stack(authenticator=auth) as stack:
        for token in (
            rs(aud="other"), rs(aud=None), rs(iss="https://evil.example.com"), rs(iss=None),
            make_token(aud="dara", iss="https://idp.example.com"),  # HS256: not allowed here
            hand_made_token({"alg": "HS256"}, {"sub": "a", "exp": int(time.time()) + 60,
                                               "aud": "dara", "iss": "https://idp.example.com"},
                            public_pem),
        ):
            await assert_rejected(stack, token)
        transport = await stack.connect(rs(iss="https://idp2.example.com", aud=["x", "dara"]))
        assert json.loads(await transport.receive())["type"] == "init"
        await transport.close()


async def test_wrong_origins_get_403_before_the_authenticator_runs(make_stack: MakeStack) -> None:
    calls: list[str] = []

    def verify(token: str) -> Identity:
        calls.append(token)
        return verify_token(token)

    auth = check_origin(token_authenticator(verify), [APP_ORIGIN, "http://localhost:8000"],
                        allow_missing=False)
    async with make_stack(authenticator=auth) as stack:
        for origin in (
            "https://evil.example.com",
            "https://app.example.com.evil.com",
            "http://app.example.com",  # scheme differs
            "https://app.example.com:8443",  # port differs
            "null",  # sandboxed iframes and file: pages
            "",
        ):
            await assert_rejected(stack, "alice:s1", headers=[("Origin", origin)])
        await assert_rejected(stack, "alice:s1")  # no Origin, and allow_missing=False
        assert calls == []
        for origin in (APP_ORIGIN, "HTTPS://APP.EXAMPLE.COM", "http://localhost:8000/"):
            transport = await stack.connect("alice:s1", headers=[("Origin", origin)])
            assert json.loads(await transport.receive())["type"] == "init"
            await transport.close()
        # A good origin never excuses a bad token.
        await eventually(lambda: not stack.manager.handlers)
        await assert_rejected(stack, "bad", headers=[("Origin", APP_ORIGIN)])


async def test_origin_check_lets_non_browser_clients_in_when_allowed(
    make_stack: MakeStack,
) -> None:
    auth = check_origin(token_authenticator(verify_token), [APP_ORIGIN])
    async with make_stack(authenticator=auth) as stack:
        transport = await stack.connect("alice:s1")
        assert json.loads(await transport.receive())["type"] == "init"
        await transport.close()
        await eventually(lambda: not stack.manager.handlers)
        await assert_rejected(stack, "alice:s1", headers=[("Origin", "https://evil.example.com")])


async def test_crashing_authenticator_rejects_with_403(make_stack: MakeStack) -> None:
    def broken(request: HandshakeRequest) -> Identity:
        raise RuntimeError("database password is hunter2")

    async with make_stack(authenticator=broken) as stack:
        await assert_rejected(stack, "alice:s1")


async def test_an_authenticators_own_timeout_error_is_a_failure_not_a_timeout(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    # Its identity provider's client gave up at once (TimeoutError): it was counted and logged
    # as "the authenticator took over 5 s", with no traceback, where it had taken no time.
    async def provider_gave_up(request: HandshakeRequest) -> Identity:
        raise TimeoutError("identity provider did not answer")

    async with make_stack(authenticator=provider_gave_up) as stack:
        await assert_rejected(stack, "alice:s1")
        assert stack.manager.stats().handshakes_rejected == {"error": 1}
    [record] = [r for r in caplog.records if "authenticator" in r.getMessage()]
    assert record.getMessage() == "authenticator failed" and record.exc_info is not None


async def test_an_authenticator_that_never_answers_rejects_within_the_handshake_bound(
    make_stack: MakeStack,
) -> None:
    """A stuck identity provider holds no socket for ever: the handshake waiting on it gets 403
    after half of ``handshake_timeout`` (before the transport's own bound drops the socket), and
    the other handshakes go through meanwhile."""
    stuck = asyncio.Event()  # never set: the provider does not answer
    waiting: list[str] = []

    async def slow_for_some(request: HandshakeRequest) -> Identity:
        token = request.query.get("token", "")
        if token.startswith("slow"):
            waiting.append(token)
            await stuck.wait()
        return verify_token(token)

    config = ServerConfig(handshake_timeout=2.0)
    async with make_stack(authenticator=slow_for_some, config=config) as stack:
        rejected = asyncio.create_task(stack.connect("slow:s1"))
        await eventually(lambda: waiting == ["slow:s1"], "the slow handshake reached the authenticator")
        transport = await stack.connect("alice:s1")
        assert json.loads(await transport.receive())["type"] == "init"
        assert not rejected.done()
        with pytest.raises(HandshakeRejected) as info:
            await asyncio.wait_for(rejected, config.handshake_timeout * 5)
        assert info.value.status == 403
        assert stack.manager.stats().handshakes_rejected == {"timeout": 1}
        assert len(stack.manager.handlers) == 1  # alice's, nothing of the rejected one
        await transport.close()


# ----------------------------------------------------------------------------- live identities


async def test_jwt_expiry_closes_the_live_connection_with_1008(make_stack: MakeStack) -> None:
    token = make_token(exp=int(time.time()) + 2)
    async with make_stack(authenticator=jwt_authenticator(SECRET)) as stack:
        client = await stack.client(token)
        survivor = await stack.client(make_token(sub="bob"))
        channel = client.channel or ""
        pending = asyncio.create_task(stack.manager.send_and_wait(channel, {"q": 1}, timeout=30))
        closed = await client.wait_closed(timeout=6)
        assert closed is not None
        assert closed.code == CloseCode.POLICY_VIOLATION
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(pending, 5)
        assert info.value.code == CloseCode.POLICY_VIOLATION
        await eventually(lambda: channel not in stack.manager.handlers)
        assert stack.manager.get_user_channels("alice") == set()
        assert survivor.connected
        await stack.manager.send_message(survivor.channel or "", {"still": "here"})
        assert (await survivor.receive(timeout=5)).message.model_dump() == {"still": "here"}


async def test_identity_expiry_works_for_any_authenticator(make_stack: MakeStack) -> None:
    def verify(token: str) -> Identity:
        user, _, session = token.partition(":")
        return Identity(user_id=user, session_id=session, expires_at=time.time() + 0.5)

    async with make_stack(authenticator=token_authenticator(verify)) as stack:
        client = await stack.client("carol:s9")
        closed = await client.wait_closed(timeout=5)
        assert closed is not None and closed.code == CloseCode.POLICY_VIOLATION
        await eventually(lambda: not stack.manager.handlers)
        assert stack.manager.registry.counts() == (0, 0, 0)


async def test_disconnect_user_revokes_every_connection_of_that_user(make_stack: MakeStack) -> None:
    async with make_stack() as stack:
        tabs = [await stack.client("alice:s1"), await stack.client("alice:s1"),
                await stack.client("alice:s2")]
        bob = await stack.client("bob:s3")
        pending = asyncio.create_task(
            stack.manager.send_and_wait(tabs[0].channel or "", {"q": 1}, timeout=30)
        )
        await asyncio.sleep(0)
        assert stack.manager.disconnect_user("alice") == 3
        for tab in tabs:
            closed = await tab.wait_closed(timeout=5)
            assert closed is not None
            assert (closed.code, closed.reason) == (CloseCode.POLICY_VIOLATION, "revoked")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(pending, 5)
        await eventually(lambda: len(stack.manager.handlers) == 1)
        assert stack.manager.registry.counts() == (1, 1, 1)
        assert stack.manager.disconnect_user("alice") == 0
        await stack.manager.send_message_to_user("bob", {"n": 1})
        assert (await bob.receive(timeout=5)).message.model_dump() == {"n": 1}


async def test_disconnect_session_revokes_one_login_only(make_stack: MakeStack) -> None:
    async with make_stack() as stack:
        s1 = [await stack.client("alice:s1"), await stack.client("alice:s1")]
        s2 = await stack.client("alice:s2")
        assert stack.manager.disconnect_session("s1", reason="logged out") == 2
        for tab in s1:
            closed = await tab.wait_closed(timeout=5)
            assert closed is not None
            assert (closed.code, closed.reason) == (CloseCode.POLICY_VIOLATION, "logged out")
        await eventually(lambda: len(stack.manager.handlers) == 1)
        assert stack.manager.registry.session_channels("s1") == set()
        assert stack.manager.get_user_channels("alice") == {s2.channel}
        assert s2.connected


async def test_per_user_connection_limit_rejects_extra_handshakes(make_stack: MakeStack) -> None:
    async with make_stack(config=ServerConfig(max_connections_per_user=2)) as stack:
        first = await stack.client("alice:s1")
        await stack.client("alice:s2")
        await stack.client("bob:s3")  # other users are counted apart
        with pytest.raises(HandshakeRejected) as info:
            await stack.connect("alice:s4")
        assert info.value.status == 403
        assert len(stack.manager.get_user_channels("alice")) == 2
        await first.close()
        await eventually(lambda: len(stack.manager.get_user_channels("alice")) == 1)
        await stack.client("alice:s5")  # a slot freed by a disconnect is usable again


async def test_per_user_connection_limit_holds_under_concurrent_handshakes(
    make_stack: MakeStack,
) -> None:
    limit = 3
    held: list[Any] = []  # open until the end: a client dropped early lets the next one in
    async with make_stack(config=ServerConfig(max_connections_per_user=limit)) as stack:

        async def attempt(i: int) -> str:
            try:
                transport = await stack.connect(f"alice:s{i}")
            except HandshakeRejected as exc:
                return f"http {exc.status}"
            held.append(transport)
            try:
                frame = json.loads(await asyncio.wait_for(transport.receive(), 5))
                return str(frame["type"])
            except ConnectionClosed as exc:
                return f"closed {exc.code}"

        outcomes = await asyncio.gather(*(attempt(i) for i in range(12)))
        assert outcomes.count("init") <= limit
        assert set(outcomes) <= {"init", "http 403", f"closed {CloseCode.POLICY_VIOLATION}"}
        assert len(stack.manager.get_user_channels("alice")) == outcomes.count("init") <= limit


def test_anonymous_identities_share_per_address_bounds_and_named_ones_per_user() -> None:
    anonymous = allow_anonymous()
    request = HandshakeRequest.build("/ws", [], ("10.0.0.7", 5000))
    first, second = anonymous(request), anonymous(request)
    assert isinstance(first, Identity) and isinstance(second, Identity)
    assert first.anonymous and first.user_id != second.user_id
    # A peer gets a fresh anonymous user with each connection, not a fresh address.
    assert holder_of(first, "10.0.0.7") == holder_of(second, "10.0.0.7") == ("address", "10.0.0.7")
    assert holder_of(first, "10.0.0.8") != holder_of(first, "10.0.0.7")
    # No user id, whatever a client names itself, can take an address's share.
    named = Identity(user_id="address 10.0.0.7", session_id="s")
    assert holder_of(named, "10.0.0.7") == "address 10.0.0.7"
    # Without an address, an anonymous connection is on its own; with no identity, its channel.
    assert holder_of(first, None) == first.user_id
    assert holder_of(None, None) is None and holder_of(None, "10.0.0.7") == ("address", "10.0.0.7")
