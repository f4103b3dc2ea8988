"""The channel -> session -> user registry (protocol.md section 5): nothing stale, nothing leaks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core.registry import ChannelRegistry

# Few names, so that channels share sessions and users (and a session id may even be claimed by
# two users: the registry must not mix their channels).
channels = st.sampled_from([f"c{i}" for i in range(12)])
sessions = st.sampled_from(["s1", "s2", "s3", "s4"])
users = st.sampled_from(["alice", "bob", "carol"])

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), channels, sessions, users),
        st.tuples(st.just("remove"), channels, st.just(""), st.just("")),
    ),
    max_size=60,
)


def assert_matches(registry: ChannelRegistry, model: dict[str, tuple[str, str]]) -> None:
    assert len(registry) == len(model)
    all_sessions = {s for s, _ in model.values()}
    all_users = {u for _, u in model.values()}
    assert registry.counts() == (len(model), len(all_sessions), len(all_users))
    for channel, (session, user) in model.items():
        assert channel in registry
        assert registry.session_of(channel) == session
        assert registry.user_of(channel) == user
    for session in ("s1", "s2", "s3", "s4"):
        assert registry.session_channels(session) == {
            c for c, (s, _) in model.items() if s == session
        }
    for user in ("alice", "bob", "carol"):
        mine = {c for c, (_, u) in model.items() if u == user}
        assert registry.user_channels(user) == mine
        assert registry.user_sessions(user) == {model[c][0] for c in mine}
        # The union over the user's sessions, restricted to the user's own channels.
        union = set().union(*(registry.session_channels(s) for s in registry.user_sessions(user)))
        assert registry.user_channels(user) == {c for c in union if model[c][1] == user}
    # No empty set survives anywhere.
    assert all(registry._sessions.values())
    assert all(registry._users.values())


@given(operations)
def test_any_order_of_adds_and_removes_matches_the_model_and_leaves_no_empty_set(
    ops: list[tuple[str, str, str, str]],
) -> None:
    registry = ChannelRegistry()
    model: dict[str, tuple[str, str]] = {}
    for op, channel, session, user in ops:
        if op == "add":
            if channel in model:
                with pytest.raises(ValueError, match="already registered"):
                    registry.add(channel, session, user)
            else:
                registry.add(channel, session, user)
                model[channel] = (session, user)
        else:
            registry.remove(channel)
            model.pop(channel, None)
        assert_matches(registry, model)
    for channel in list(model):
        registry.remove(channel)
    assert registry.counts() == (0, 0, 0)
    assert_matches(registry, {})


@given(st.permutations([f"c{i}" for i in range(8)]))
def test_removing_every_channel_in_any_order_returns_counts_to_zero(order: list[str]) -> None:
    registry = ChannelRegistry()
    for i in range(8):
        registry.add(f"c{i}", f"s{i % 3}", f"u{i % 2}")
    assert registry.counts() == (8, 3, 2)
    for channel in order:
        registry.remove(channel)
        registry.remove(channel)  # idempotent
    assert registry.counts() == (0, 0, 0)
    assert registry.user_channels("u0") == set()
    assert registry.user_sessions("u0") == set()
    assert registry.session_channels("s0") == set()


def test_user_channels_is_the_union_over_the_users_sessions() -> None:
    registry = ChannelRegistry()
    registry.add("c1", "s1", "alice")
    registry.add("c2", "s1", "alice")
    registry.add("c3", "s2", "alice")
    registry.add("c4", "s3", "bob")
    assert registry.user_sessions("alice") == {"s1", "s2"}
    assert registry.user_channels("alice") == {"c1", "c2", "c3"}
    assert registry.user_channels("bob") == {"c4"}
    assert registry.user_channels("nobody") == set()


def test_a_session_id_claimed_by_two_users_never_mixes_their_channels() -> None:
    registry = ChannelRegistry()
    registry.add("c1", "shared", "alice")
    registry.add("c2", "shared", "mallory")
    assert registry.user_channels("alice") == {"c1"}
    assert registry.user_channels("mallory") == {"c2"}
    registry.remove("c2")
    assert registry.counts() == (1, 1, 1)
    registry.remove("c1")
    assert registry.counts() == (0, 0, 0)
    assert registry.user_channels("alice") == set()


def test_returned_sets_are_copies() -> None:
    registry = ChannelRegistry()
    registry.add("c1", "s1", "alice")
    registry.user_channels("alice").add("evil")
    registry.session_channels("s1").add("evil")
    registry.user_sessions("alice").add("evil")
    assert registry.user_channels("alice") == {"c1"}
    assert registry.session_channels("s1") == {"c1"}
    assert registry.user_sessions("alice") == {"s1"}


def test_a_taken_channel_id_is_refused_and_changes_nothing() -> None:
    registry = ChannelRegistry()
    registry.add("c1", "s1", "alice")
    with pytest.raises(ValueError):
        registry.add("c1", "s2", "bob")
    assert registry.counts() == (1, 1, 1)
    assert registry.user_of("c1") == "alice"
    assert registry.session_of("unknown") is None
    assert registry.user_of("unknown") is None
