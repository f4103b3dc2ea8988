"""The channel -> session -> user registry (protocol.md section 5).

One instance per manager: no module-level state that two managers would share. Entries are removed
when the last connection of a session or user goes, so nothing leaks (Dara kept empty sets and
never pruned sessions).
"""

from __future__ import annotations

__all__ = ["ChannelRegistry"]


class ChannelRegistry:
    """Maps channels to their session and user, and users to their channels."""

    __slots__ = ("_channels", "_sessions", "_users")

    def __init__(self) -> None:
        self._channels: dict[str, tuple[str, str]] = {}
        # A key with one channel maps to that channel id, not to a set of one: most users and
        # sessions have one tab, and a set costs about 200 bytes per index per connection.
        self._sessions: dict[str, str | set[str]] = {}
        # user -> channels directly (not via sessions), so a session id shared by two users
        # never mixes their channels.
        self._users: dict[str, str | set[str]] = {}

    def add(self, channel_id: str, session_id: str, user_id: str) -> None:
        """Register a new channel; raises ``ValueError`` if the channel id is taken."""
        if channel_id in self._channels:
            raise ValueError(f"channel {channel_id!r} is already registered")
        self._channels[channel_id] = (session_id, user_id)
        _index_add(self._sessions, session_id, channel_id)
        _index_add(self._users, user_id, channel_id)

    def remove(self, channel_id: str) -> None:
        """Unregister a channel and any session or user left without channels; idempotent."""
        entry = self._channels.pop(channel_id, None)
        if entry is None:
            return
        session_id, user_id = entry
        for index, key in ((self._sessions, session_id), (self._users, user_id)):
            channels = index[key]
            if isinstance(channels, str):
                del index[key]
            else:
                channels.discard(channel_id)
                if len(channels) == 1:
                    index[key] = channels.pop()
                elif not channels:
                    del index[key]

    def __contains__(self, channel_id: object) -> bool:
        return channel_id in self._channels

    def __len__(self) -> int:
        return len(self._channels)

    def session_of(self, channel_id: str) -> str | None:
        entry = self._channels.get(channel_id)
        return entry[0] if entry else None

    def user_of(self, channel_id: str) -> str | None:
        entry = self._channels.get(channel_id)
        return entry[1] if entry else None

    def session_channels(self, session_id: str) -> set[str]:
        """A copy of the session's channels (empty if none)."""
        return _members(self._sessions, session_id)

    def user_channels(self, user_id: str) -> set[str]:
        """A copy of every channel of every session of the user (empty if none)."""
        return _members(self._users, user_id)

    def user_sessions(self, user_id: str) -> set[str]:
        return {self._channels[c][0] for c in _members(self._users, user_id)}

    def counts(self) -> tuple[int, int, int]:
        """(channels, sessions, users) currently registered: for leak checks and metrics."""
        return len(self._channels), len(self._sessions), len(self._users)


def _index_add(index: dict[str, str | set[str]], key: str, channel_id: str) -> None:
    channels = index.get(key)
    if channels is None:
        index[key] = channel_id
    elif isinstance(channels, str):
        index[key] = {channels, channel_id}
    else:
        channels.add(channel_id)


def _members(index: dict[str, str | set[str]], key: str) -> set[str]:
    channels = index.get(key)
    if channels is None:
        return set()
    return {channels} if isinstance(channels, str) else set(channels)
