"""The Redis backplane (redis-py asyncio): several server processes share one Redis.

The routing logic is the core's :class:`~dara_ws_core.backplane.BrokerBackplane`; this module only
maps its bus primitives onto Redis and translates redis-py errors into ``BackplaneError``::

    backplane = RedisBackplane("redis://127.0.0.1:6379/0")
    manager = WebsocketManager(config, backplane=backplane)
    await backplane.start(manager)

Redis layout (``<ns>`` is the namespace, ``dara-ws`` by default):

* pub/sub ``<ns>:node:<node_id>``: messages for the channels of one process (route by interest);
* pub/sub ``<ns>:broadcast``: broadcasts, heard by every process;
* ``<ns>:ch:<channel_id>`` -> node id, a string with a TTL of ``expiry``;
* ``<ns>:user:<user_id>`` -> hash channel id -> node id, with the same TTL;
* ``<ns>:outbox:<user_id>``: a Stream, the user's history: every message sent to the user with
  ``send_message_to_user`` (the per-user outbox, :mod:`dara_ws_core.outbox`), trimmed by count,
  bytes and age; ``<ns>:outbox-meta:<user_id>``, a hash: its bytes (``b``), the last number given
  to the user (``n``), the written mark (``w``: the last entry written to a connection of
  the user) and, per sender with entries waiting there, their count and bytes (``h:<quota
  key>``, ``hb:<quota key>``: its share of the history); both keys expire ``max_age`` after the
  last message;
* ``<ns>:outbox-lease:<user_id>`` -> ``node\nchannel\nlast``: the new channel delivering the
  entries after the written mark (read, then acknowledge) up to entry ``last``, expiring after
  ``max_age``, void once that channel or its node is gone (``\nlast`` once it settled without
  writing them all); while it exists, no acknowledgement of an entry after ``last`` but the
  holder's moves the written mark;
* ``<ns>:outbox-quota:<sender>`` -> hash: the messages (``c``) and their bytes (``b``) a sender
  (a user, or an anonymous connection's address: :func:`~dara_ws_core.outbox.anonymous_sender`)
  has waiting for their users, and when the count began (``p``); deleted once nothing waits,
  expiring ``max_age`` after it was made (its share: ``outbox_per_sender``, a 16th of
  ``outbox_users`` and of ``outbox_total_bytes``);
* ``<ns>:outbox-address:<address>`` -> hash: the same for the senders of one address together
  (:func:`~dara_ws_core.outbox.address_of`; its share: a quarter of ``outbox_users`` and of
  ``outbox_total_bytes``, :data:`~dara_ws_core.outbox.ADDRESS_SHARES`);
* ``<ns>:outbox-window:<k>`` -> hash: the users with something waiting (``u``) and the bytes
  waiting (``b``) counted in the ``k``-th window of ``max_age``, expiring after two windows
  (``outbox_users`` and ``outbox_total_bytes`` bound this window's and the previous one's sums);
  a message leaves them once written (the acknowledgement) or dropped by its user's bounds, a
  user once their history is written to the end (the meta hash's ``u``: the window that
  counted them, while they count);
* ``<ns>:missed:<node_id>`` -> hash user -> count: the node's gap ledger, used with the outbox
  off: messages for its users that found nobody listening on its topic (read and reset when the
  node resubscribes);
* each entry of a user's history holds the message (``d``), its number for the user (``n``),
  the window that counted it (``s``), its sender's counters (``q``, ``p``: their key and the
  count's ``p``) and its sender's id for it (``k``: ``<node_id>-<life>-<number>``, the life a
  mark drawn at each start of the process, so that a process restarted with the same
  ``node_id`` never reuses one), and the meta hash the highest number each node appended (``k:<node_id>``; the
  numbers start from the wall clock in µs, so a later life's are higher): a message sent again
  after a round trip that failed (part of which may have run) is found among the user's 1,000
  newest entries, the same id and the same bytes, and not appended twice (beyond those, it may
  be: a duplicate, never a loss);
* ``<ns>:revoked:<scope>:<target>`` -> ``<ms> <code> <reason>``, expiring ``revoke_ttl`` after
  ``<ms>``: the latest revocation of a user, session or channel, set in the same step as it is
  published, for the processes whose subscription was down at that moment. ``<ms>`` is when the
  application asked for it, on Redis's clock (``TIME``) as the asking process measured it
  against its own at its last heartbeat; a revocation published late (from the spool, after an
  outage) keeps that time.

A Stream rather than a list: entry ids are Redis's own millisecond clock, so the age bound needs no
clock of ours (processes' clocks may disagree), ids stay increasing across a Redis restart that
lost the data (a process's "last entry handed over" stays meaningful), trimming the oldest is
cheap and reading "after id X" is one ``XRANGE``. A message is appended in the same script that
publishes it, with the entry's id and number added to the published header, and a new channel is
registered in the same script that leases the entries after the written mark: Redis runs scripts
one at a time, so whatever a new channel did not get from the history reaches it live. What Redis
has acknowledged survives the restart or crash of any server process (and of Redis itself with
persistence on: ``appendonly yes``).

Each node re-writes its entries every ``heartbeat_interval`` (which also restores them after a
Redis restart that lost its data); a dead node's entries expire. A user's hash may outlive a dead
node's fields while another node refreshes it: readers check each field against its channel key,
and a message to the user drops the fields of nodes nobody listens for.

Routing a message costs one round trip and no look-up of its own: small Lua scripts read the
directory and ``PUBLISH`` in the same step, and every publication of a process is pipelined.
Redis is trusted: whoever can publish on it can send frames to every client.

The subscription runs on its own connection without retries, so a lost connection is noticed at
once (and probed with ``PING`` when the bus is quiet); commands use a pool that retries once on a
stale connection.
"""

from __future__ import annotations

__all__ = ["RedisBackplane"]

import asyncio
import contextlib
import hashlib
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        BusyLoadingError,
        ClusterDownError,
        MasterDownError,
        NoScriptError,
        OutOfMemoryError,
        ReadOnlyError,
        RedisError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_redis needs the redis library: pip install "dara-ws-core[redis]"', name=exc.name
    ) from exc

from dara_ws_core.backplane import BrokerBackplane, Entry, Publication, Routed
from dara_ws_core.backplane.broker import Kept, Revocation
from dara_ws_core.backplane.node import BatchRefused
from dara_ws_core.config import _check_number
from dara_ws_core.exceptions import BackplaneError
from dara_ws_core.outbox import ADDRESS_SHARES, HISTORY_SHARES, SENDER_SHARES, SENDER_SMALL, OutboxLimits

_BATCH = 3000  # directory commands per pipeline round trip
# The longest a process remembers a refusal of the bus's outbox (its next kept sends are not
# offered meanwhile): the bounds count what waits, so room comes back as users read.
_RECHECK_MS = 2000

# Error replies that say the server cannot serve anyone for now, rather than refuse one command:
# what they fail is tried again without counting a try (see BatchRefused). redis-py turns the
# codes it knows into these classes (dropping the code from the text); the others keep it.
_PASSING = (OutOfMemoryError, BusyLoadingError, ReadOnlyError, MasterDownError, TryAgainError,
            ClusterDownError, RedisConnectionError)
_PASSING_CODES = ("BUSY", "NOREPLICAS")

# Look a channel up and publish to its node in one round trip (atomic, so no race between the
# two). KEYS[1]: the channel's key; ARGV: this node, the node topic prefix, the message.
# Returns nil (nobody holds it), {node, -1} (this node does), or {node, receivers}.
_ROUTE = """
local node = redis.call('GET', KEYS[1])
if not node then return false end
if node == ARGV[1] then return {node, -1} end
return {node, redis.call('PUBLISH', ARGV[2] .. node, ARGV[3])}
"""

# Is stream id ARGV a after b? (ids are "<ms>-<seq>": compared as numbers, not strings.)
_LATER = """
local function later(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
"""

# Entries (as XRANGE returns them) that no longer wait for their user: written to a connection of
# the user, or dropped by a bound before. Their bytes leave the window that counted them (ARGV
# prefix .. the entry's field s; a window gone counts nothing anymore), and each leaves its
# sender's count (field q: the counters' key; field p: the count it was charged to: a count
# begun since, after that one expired, is not touched) and its address's (fields a and r, the
# same). A count left with nothing is deleted. Entries kept before these fields were stored
# release nothing (their window, or their address's count, expires with them).
# One EXISTS or HGET per window, per sender and per address among them, whatever their number.
_RELEASE = """
local function release(entries, prefix)
  local windows, quotas = {}, {}
  local function charged(key, count, size)
    if key and key ~= '' then
      local id = key .. '\\n' .. count
      local q = quotas[id]
      if not q then
        q = {key, count, 0, 0}
        quotas[id] = q
      end
      q[3], q[4] = q[3] + 1, q[4] + size
    end
  end
  for _, e in ipairs(entries) do
    local f = e[2]
    if f[8] then
      local size = #f[2]
      windows[f[8]] = (windows[f[8]] or 0) + size
      charged(f[10], f[12], size)
      charged(f[14], f[16], size)
    end
  end
  for slot, size in pairs(windows) do
    if redis.call('EXISTS', prefix .. slot) == 1 then
      redis.call('HINCRBY', prefix .. slot, 'b', -size)
    end
  end
  for _, q in pairs(quotas) do
    if redis.call('HGET', q[1], 'p') == q[2] then
      if redis.call('HINCRBY', q[1], 'c', -q[3]) <= 0 then
        redis.call('DEL', q[1])
      else
        redis.call('HINCRBY', q[1], 'b', -q[4])
      end
    end
  end
end
"""

# A sender's share of one user's history (the in-process outbox's rule: UserOutbox.add): the
# meta hash counts, per sender's counters key q, its entries waiting (field "h:<q>") and their
# bytes ("hb:<q>"); hold counts one appended, unhold the entries (as XRANGE returns them) that no
# longer wait (written, or dropped by a bound). history_room says whether a message of ``size``
# bytes charged to q may join the history: q under its share (a HISTORY-th of ``most`` and
# ``cap``), and room under the user's bounds made by dropping only entries written or expired
# (before ``cutoff``), the oldest first: never an entry still waiting, whoever sent it.
_HISTORY_SHARE = """
local function hold(meta, q, size)
  redis.call('HINCRBY', meta, 'h:' .. q, 1)
  redis.call('HINCRBY', meta, 'hb:' .. q, size)
end
local function unhold(entries, meta)
  local held = {}
  for _, e in ipairs(entries) do
    local f = e[2]
    if f[8] and f[10] ~= '' then
      local h = held[f[10]]
      if not h then
        h = {0, 0}
        held[f[10]] = h
      end
      h[1], h[2] = h[1] + 1, h[2] + #f[2]
    end
  end
  for q, h in pairs(held) do
    if redis.call('HINCRBY', meta, 'h:' .. q, -h[1]) <= 0 then
      redis.call('HDEL', meta, 'h:' .. q, 'hb:' .. q)
    else
      redis.call('HINCRBY', meta, 'hb:' .. q, -h[2])
    end
  end
end
local function history_room(stream, meta, q, size, most, cap, cutoff, prefix)
  local held = redis.call('HMGET', meta, 'h:' .. q, 'hb:' .. q, 'b')
  if tonumber(held[1] or '0') >= math.max(1, math.floor(most / HISTORY))
      or tonumber(held[2] or '0') + size > math.max(1, math.floor(cap / HISTORY)) then
    return false
  end
  local count, bytes = redis.call('XLEN', stream), tonumber(held[3] or '0')
  if count + 1 <= most and bytes + size <= cap then return true end
  local written = redis.call('HGET', meta, 'w')
  while count > 0 and (count + 1 > most or bytes + size > cap) do
    local heads = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.max(count + 1 - most, 1))
    if #heads == 0 then break end
    local dropped, waiting, freed, full = {}, {}, 0, false
    for _, head in ipairs(heads) do
      if count + 1 <= most and bytes - freed + size <= cap then break end
      local wait = not written or later(head[1], written)
      if wait and tonumber(string.match(head[1], '^(%d+)')) > cutoff then
        full = true
        break
      end
      if wait then waiting[#waiting + 1] = head end
      dropped[#dropped + 1] = head[1]
      freed = freed + #head[2][2]
      count = count - 1
    end
    if #dropped > 0 then
      redis.call('XDEL', stream, unpack(dropped))
      bytes = redis.call('HINCRBY', meta, 'b', -freed)
      if #waiting > 0 then
        release(waiting, prefix)
        unhold(waiting, meta)
      end
    end
    if full then return false end
  end
  return true
end
"""

# Record a revocation (KEYS[1], ARGV[1..3]: TTL ms, code, reason; ARGV[6]: when it was asked
# for, in ms on Redis's clock, as the asking process measured it) and publish it (ARGV[4],
# ARGV[5]: topic, message) in one step. The record keeps the latest revocation of the target
# (one sent again, or late, neither moves its time nor replaces a newer one) and expires TTL
# after it was asked for. Returns the receivers.
_REVOKE = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local when = tonumber(ARGV[6])
local ttl = tonumber(ARGV[1]) - math.max(0, ms - when)
local old = redis.call('GET', KEYS[1])
local known = old and tonumber(string.match(old, '^(%d+)'))
if ttl > 0 and not (known and known >= when) then
  redis.call('SET', KEYS[1], ARGV[6] .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ttl)
end
return redis.call('PUBLISH', ARGV[4], ARGV[5])
"""

# Publish once to every other node holding channels of a user, in one round trip. KEYS[1]: the
# user's hash; ARGV[1..3] as above; ARGV[4..7]: the gap ledger key prefix, the user, the ledger's
# TTL in ms, the channel key prefix. With the outbox on (ARGV[8..10]: most messages, bytes, age
# in ms; KEYS[2]: the user's history stream, KEYS[3]: its meta hash), the message is first
# appended to the history (trimmed by count, bytes and age, the oldest first; for a client's
# message, only what is written or expired, see history_room) and published with
# the entry's id and number in its header: returns "<id> <n> <receivers>". Fields of nodes nobody
# listens for are dropped once their channel key is gone too (a dead node's; a node cut off for
# less than the expiry keeps them, so that with the outbox off its gap ledger counts every
# message it missed). Returns the receivers in all.
#
# The outbox as a whole is bounded too (ARGV[11..16]: the sender's counters' key, '' for a send
# charged to nobody; the most messages per sender; the window counters' key prefix; the most
# histories and bytes; the sender's address's counters' key, '' for none). Every count is of
# what waits: a message leaves them once written to a connection of its user (the
# acknowledgement, _SETTLE) or dropped by a bound before (see release). A message is refused
# (not kept, still published) when its sender's counters are at its share (ARGV[12] messages, a
# SHARES-th of the bytes; the counters also expire ``age`` after the count began, field p), or
# its address's at theirs (an ADDRESSES-th of the histories and of the bytes, the same expiry),
# or when the histories waiting (a user with nothing waiting counts once a message for them is
# kept: meta field u, the window that counted them) or the bytes waiting, counted in this window
# of ``age`` ms and the previous one, would go past the bounds (each window's counters expire
# after two windows). The last SHARES-th of both bounds is kept for sends charged to nobody
# (server code), and the one before it for senders holding little (under a SMALL-th of their
# share) from addresses holding little (the same): a sender refused there is refused as over its
# share ("sender", or "address": its address's), not the outbox as a whole. A refusal says how
# long it lasts at most (the count's or the window's end), but no more than RECHECK ms: room
# comes back as users read.
#
# ARGV[17], ARGV[18] (with the outbox on, a kept message from a node that numbers them): the
# message's number at its node and the node's scope for numbers (its id and process life),
# stored with the entry (field k: "<scope>-<number>"); the meta hash keeps the highest number per
# node id (field "k:<node>"): a number not above it may be a message sent again (a round trip
# failed, part of which may have run), answered as its entry if the user's newest entries hold
# one with the same k and the same message, not appended twice. Any other match is another
# message (another life of the node), appended: the search never drops a message.
_ROUTE_USER = _LATER + _RELEASE + _HISTORY_SHARE + """
-- kid: a kept message sent again that the first run appended is answered with that entry.
local kid, last = nil, 0
if ARGV[17] then
  kid = ARGV[18] .. '-' .. ARGV[17]
  last = tonumber(redis.call('HGET', KEYS[3], 'k:' .. ARGV[1]) or '0')
  if tonumber(ARGV[17]) <= last then
    for _, e in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1000)) do
      if e[2][6] == kid and e[2][2] == ARGV[3] then return e[1] .. ' ' .. e[2][4] .. ' 0' end
    end
  end
end
local message, kept, n = ARGV[3], nil, 0
local keep = ARGV[8] ~= nil and #ARGV[3] <= tonumber(ARGV[9])
local t, slot, window, new, refused, wait, period, place
if keep then
  local age, size = tonumber(ARGV[10]), #ARGV[3]
  local most_users, most_bytes = tonumber(ARGV[14]), tonumber(ARGV[15])
  local quota, share = tonumber(ARGV[12]), math.max(1, math.floor(most_bytes / SHARES))
  local room = math.max(1, math.floor(most_users / ADDRESSES))
  local room_bytes = math.max(1, math.floor(most_bytes / ADDRESSES))
  local address = ARGV[11] ~= '' and ARGV[16] or ''
  local mine, mine_bytes, ours, ours_bytes = 0, 0, 0, 0
  if ARGV[11] ~= '' then
    local held = redis.call('HMGET', ARGV[11], 'c', 'b', 'p')
    mine, mine_bytes, period = tonumber(held[1] or '0'), tonumber(held[2] or '0'), held[3]
  end
  if address ~= '' then
    local held = redis.call('HMGET', address, 'c', 'b', 'p')
    ours, ours_bytes, place = tonumber(held[1] or '0'), tonumber(held[2] or '0'), held[3]
  end
  if ARGV[11] ~= '' and (mine >= quota or mine_bytes + size > share) then
    keep, refused, wait = false, 'sender', math.min(math.max(redis.call('PTTL', ARGV[11]), 0), RECHECK)
  elseif address ~= '' and (ours >= room or ours_bytes + size > room_bytes) then
    keep, refused, wait = false, 'address', math.min(math.max(redis.call('PTTL', address), 0), RECHECK)
  else
    t = redis.call('TIME')
    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    slot = math.floor(ms / age)
    window = ARGV[13] .. slot
    local now = redis.call('HMGET', window, 'u', 'b')
    local before = redis.call('HMGET', ARGV[13] .. (slot - 1), 'u', 'b')
    new = redis.call('HEXISTS', KEYS[3], 'u') == 0  -- nothing of the user's waits
    local users = tonumber(now[1] or '0') + tonumber(before[1] or '0')
    local total = tonumber(now[2] or '0') + tonumber(before[2] or '0')
    if total + size > most_bytes then
      keep, refused, wait = false, 'bytes', math.min(age - ms % age, RECHECK)
    elseif new and users >= most_users then
      keep, refused, wait = false, 'users', math.min(age - ms % age, RECHECK)
    elseif ARGV[11] ~= '' then
      local bytes_16th, users_16th = math.floor(most_bytes / SHARES), math.floor(most_users / SHARES)
      if total + size > most_bytes - bytes_16th or (new and users >= most_users - users_16th) then
        -- Only the last share is left: server code's.
        keep, refused, wait = false, 'sender',
            math.min(math.max(redis.call('PTTL', ARGV[11]), 0), RECHECK)
      elseif total + size > most_bytes - 2 * bytes_16th
          or (new and users >= most_users - 2 * users_16th) then
        -- The share before it: for senders holding little, from addresses holding little.
        if (mine > 0 and mine >= math.floor(quota / SMALL))
            or mine_bytes + size > math.floor(share / SMALL) then
          keep, refused, wait = false, 'sender',
              math.min(math.max(redis.call('PTTL', ARGV[11]), 0), RECHECK)
        elseif (ours > 0 and ours >= math.floor(room / SMALL))
            or ours_bytes + size > math.floor(room_bytes / SMALL) then
          keep, refused, wait = false, 'address',
              math.min(math.max(redis.call('PTTL', address), 0), RECHECK)
        end
      end
    end
  end
end
-- A client's message: within its share of this user's history, and dropping none still waiting.
if keep and ARGV[11] ~= '' and not history_room(KEYS[2], KEYS[3], ARGV[11], #ARGV[3],
    tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    - tonumber(ARGV[10]), ARGV[13]) then
  keep, refused, wait = false, 'history', RECHECK  -- room comes back as the user reads
end
if keep then
  local most, cap, age = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
  -- Count the message in a sender's (or an address's) counters, whose count began at
  -- ``begun`` (nil: a new count, known by when it began: it lasts ``age`` at most).
  local function charge(key, begun)
    if not begun then
      begun = t[1] .. '.' .. t[2]
      redis.call('HSET', key, 'p', begun)
      redis.call('PEXPIRE', key, age)
    end
    redis.call('HINCRBY', key, 'c', 1)
    redis.call('HINCRBY', key, 'b', #ARGV[3])
    return begun
  end
  if ARGV[11] ~= '' then
    period = charge(ARGV[11], period)
    if ARGV[16] ~= '' then place = charge(ARGV[16], place) end
  end
  if new then
    redis.call('HINCRBY', window, 'u', 1)
    redis.call('HSET', KEYS[3], 'u', slot)
  end
  if redis.call('HINCRBY', window, 'b', #ARGV[3]) == #ARGV[3] then  -- the window's first
    redis.call('PEXPIRE', window, 2 * age)
  end
  n = redis.call('HINCRBY', KEYS[3], 'n', 1)
  -- s, q, p, a, r: the window, the sender's count and its address's that counted it (see
  -- release).
  kept = redis.call('XADD', KEYS[2], '*', 'd', ARGV[3], 'n', n, 'k', kid or '', 's', slot,
                    'q', ARGV[11], 'p', period or '', 'a', ARGV[11] ~= '' and ARGV[16] or '',
                    'r', place or '')
  if ARGV[11] ~= '' then hold(KEYS[3], ARGV[11], #ARGV[3]) end
  if kid and tonumber(ARGV[17]) > last then redis.call('HSET', KEYS[3], 'k:' .. ARGV[1], ARGV[17]) end
  local bytes = redis.call('HINCRBY', KEYS[3], 'b', #ARGV[3])
  local count = redis.call('XLEN', KEYS[2])
  local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age
  -- The oldest entries, as many as the count bound drops plus one (whose age is checked) per
  -- read: at steady state one XRANGE, one XDEL and one HINCRBY per message.
  -- Those not written yet (after the mark) stop counting as waiting (the others already did).
  local trimmed, written = false, nil
  while count > 0 and not trimmed do
    local heads = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', math.max(count - most, 0) + 1)
    if #heads == 0 then break end
    local dropped, waiting, freed = {}, {}, 0
    for _, head in ipairs(heads) do
      local ms = tonumber(string.match(head[1], '^(%d+)'))
      if ms > cutoff and count <= most and bytes - freed <= cap then
        trimmed = true
        break
      end
      if written == nil then written = redis.call('HGET', KEYS[3], 'w') end
      if not written or later(head[1], written) then waiting[#waiting + 1] = head end
      dropped[#dropped + 1] = head[1]
      freed = freed + #head[2][2]
      count = count - 1
    end
    if #dropped > 0 then
      redis.call('XDEL', KEYS[2], unpack(dropped))
      bytes = redis.call('HINCRBY', KEYS[3], 'b', -freed)
      if #waiting > 0 then
        release(waiting, ARGV[13])
        unhold(waiting, KEYS[3])
      end
    end
  end
  redis.call('PEXPIRE', KEYS[2], age)
  redis.call('PEXPIRE', KEYS[3], age)
  message = '{"sid":"' .. kept .. '","n":' .. n .. ',' .. string.sub(ARGV[3], 2)
end
local fields = redis.call('HGETALL', KEYS[1])
local sent, stale, total = {}, {}, 0
for i = 1, #fields, 2 do
  local node = fields[i + 1]
  if node ~= ARGV[1] then
    local r = sent[node]
    if r == nil then
      r = redis.call('PUBLISH', ARGV[2] .. node, message)
      sent[node] = r
      total = total + r
    end
    if r == 0 and redis.call('GET', ARGV[7] .. fields[i]) ~= node then
      stale[#stale + 1] = fields[i]
    end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
if kept then return kept .. ' ' .. n .. ' ' .. total end  -- one string: cheaper to read back
-- Not kept, and a node holding channels of the user did not hear it (its link is down): note
-- it in that node's gap ledger, which it reads when it is back.
for node, r in pairs(sent) do
  if r == 0 then
    redis.call('HINCRBY', ARGV[4] .. node, ARGV[5], 1)
    redis.call('PEXPIRE', ARGV[4] .. node, ARGV[6])
  end
end
if refused then return {total, refused, wait} end  -- a bound: {receivers, which, ms it lasts}
return total
"""
# A sender's share, an address's, and what holding little is: the in-process outbox's
# (dara_ws_core.outbox).
_ROUTE_USER = (_ROUTE_USER.replace("SHARES", str(SENDER_SHARES)).replace("SMALL", str(SENDER_SMALL))
               .replace("ADDRESSES", str(ADDRESS_SHARES)).replace("RECHECK", str(_RECHECK_MS))
               .replace("HISTORY", str(HISTORY_SHARES)))

# Lease a user's history to a channel (read, then acknowledge: see dara_ws_core.outbox): nothing
# if a live channel holds the lease (its node listening, its channel still registered on it),
# else every entry after the user's written mark (meta field 'w') and younger than the age, with
# its id and number, and the lease is ours. KEYS: the stream, the lease, the meta hash. ARGV:
# node, channel, channel key prefix, node topic prefix, age in ms.
_LEASE_FUNCTION = """
local function lease(stream, key, meta, node, channel, chprefix, topicprefix, age)
  local current = redis.call('GET', key)
  if current then
    local hnode, hchannel = string.match(current, '^(.-)\\n(.-)\\n')
    if not hnode then hnode, hchannel = string.match(current, '^(.-)\\n(.*)$') end
    if hnode and (hnode ~= node or hchannel ~= channel) then
      local subs = redis.call('PUBSUB', 'NUMSUB', topicprefix .. hnode)[2]
      if subs > 0 and redis.call('GET', chprefix .. hchannel) == hnode then return {} end
    end
  end
  local t = redis.call('TIME')
  local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(age)
  local written = redis.call('HGET', meta, 'w')
  local from = '-'
  if written then from = '(' .. written end
  local out = {}
  for _, entry in ipairs(redis.call('XRANGE', stream, from, '+')) do
    if tonumber(string.match(entry[1], '^(%d+)')) > cutoff then
      out[#out + 1] = entry[1]
      out[#out + 1] = entry[2][4]
      out[#out + 1] = entry[2][2]
    end
  end
  if #out == 0 then
    redis.call('DEL', key)
  else
    redis.call('SET', key, node .. '\\n' .. channel .. '\\n' .. out[#out - 2], 'PX', age)
  end
  return out
end
"""

# Admit a new channel of a user, in one step: refuse it if the user has ARGV[3] live channels
# (-1: no limit; dead fields are pruned), else register it (as the directory write does) and,
# if ARGV[7] (the outbox age in ms) is set, lease the user's history to it. KEYS: the channel
# key, the user's hash, the stream, the lease, the meta hash. ARGV: node, TTL ms, limit, channel
# key prefix, channel id, node topic prefix[, age]. Returns {0} (refused) or {1, newest id,
# newest n, id, n, message, ...}.
_ATTACH = _LEASE_FUNCTION + """
local limit = tonumber(ARGV[3])
if limit >= 0 then
  local fields = redis.call('HGETALL', KEYS[2])
  local live, stale = 0, {}
  for i = 1, #fields, 2 do
    if redis.call('GET', ARGV[4] .. fields[i]) == fields[i + 1] then
      live = live + 1
    else
      stale[#stale + 1] = fields[i]
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[2], unpack(stale)) end
  if live >= limit then return {0} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[5], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if ARGV[7] == nil then return {1, '', 0} end
local out = {1, '', 0}
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
if newest then out = {1, newest[1], newest[2][4]} end
for _, item in ipairs(lease(KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[5], ARGV[4], ARGV[6],
                            ARGV[7])) do
  out[#out + 1] = item
end
return out
"""

# Settle a lease, or acknowledge (ARGV[1] ''): move the written mark to ARGV[2] ('' for none) if
# it is ahead, unless a lease other than ARGV[1]'s (node and channel) is set and ARGV[2] is after
# its last entry (whoever acknowledges it got it live, not the leased ones before it). If ARGV[1]
# holds the lease, end it; if it did not write every entry leased, the rest stay capped until
# the next lease ('\n' .. last). KEYS: the meta hash, the lease, the stream. With ARGV[3] (the
# window counters' key prefix), the entries the mark passed stop counting toward the outbox's
# bounds (release), and once nothing after it is left, the user no longer counts as waiting.
_SETTLE = _LATER + _RELEASE + _HISTORY_SHARE.replace("HISTORY", str(HISTORY_SHARES)) + """
local current = redis.call('GET', KEYS[2])
local holder, last = nil, nil
if current then
  holder, last = string.match(current, '^(.*)\\n([^\\n]*)$')
  if last and not string.find(last, '^%d+%-%d+$') then last = nil end
end
local mine = ARGV[1] ~= '' and holder == ARGV[1]
local written = redis.call('HGET', KEYS[1], 'w')
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[1]) == 1
    and (mine or not last or not later(ARGV[2], last))
    and (not written or later(ARGV[2], written)) then
  redis.call('HSET', KEYS[1], 'w', ARGV[2])
  if ARGV[3] then
    local from = '-'
    if written then from = '(' .. written end
    local passed = redis.call('XRANGE', KEYS[3], from, ARGV[2])
    release(passed, ARGV[3])
    unhold(passed, KEYS[1])
    local slot = redis.call('HGET', KEYS[1], 'u')
    if slot and #redis.call('XRANGE', KEYS[3], '(' .. ARGV[2], '+', 'COUNT', 1) == 0 then
      redis.call('HDEL', KEYS[1], 'u')
      if redis.call('EXISTS', ARGV[3] .. slot) == 1 then
        redis.call('HINCRBY', ARGV[3] .. slot, 'u', -1)
      end
    end
  end
  written = ARGV[2]
end
if not mine then return 0 end
if last and (not written or later(last, written)) then
  redis.call('SET', KEYS[2], '\\n' .. last, 'KEEPTTL')
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

# The user's history after entry ARGV[1] ('' for after the user's written mark: what no
# connection of the user wrote; all of it without a mark), at most ARGV[2] entries younger than
# ARGV[3] ms, and the user's last number: {n, id, n, message, ...}. KEYS: the stream, the meta.
_HISTORY = """
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
local after = ARGV[1]
if after == '' then after = redis.call('HGET', KEYS[2], 'w') or '' end
local from = '-'
if after ~= '' then from = '(' .. after end
local out = {tonumber(redis.call('HGET', KEYS[2], 'n') or '0')}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', ARGV[2])) do
  if tonumber(string.match(entry[1], '^(%d+)')) > cutoff then
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][4]
    out[#out + 1] = entry[2][2]
  end
end
return out
"""


#: The SHA1 of each script published in batches (called with EVALSHA).
_SHA1 = {script: hashlib.sha1(script.encode()).hexdigest()
         for script in (_ROUTE, _ROUTE_USER, _SETTLE, _REVOKE)}


def _without_password(url: str) -> str:
    """``url`` as it may be shown: without its user and password (nor a query, where redis-py
    also takes one). A URL that cannot be split shows its scheme only: what follows may hold
    the password."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced bracket ("redis://u:pw@[::1"), say
        scheme = url.partition("://")[0] if "://" in url else ""
        return f"{scheme}://***" if scheme.isalnum() else "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisBackplane(BrokerBackplane):
    """A backplane over Redis pub/sub and keys. One per server process.

    ``url`` is a redis-py URL (``redis://[:password@]host:port/db``, ``rediss://`` for TLS);
    ``socket_timeout`` bounds every command. The other options are
    :class:`~dara_ws_core.backplane.BrokerBackplane`'s (``node_id``, ``namespace``,
    ``heartbeat_interval``, ``expiry``, ``revoke_ttl``, ``connect_timeout``, ``backoff_initial``,
    ``backoff_max``, ``max_outbox``, ``max_outbox_bytes``, ``max_bus_message``, ``publish_window``,
    ``max_spool``, ``max_spool_bytes``, ``stop_drain``): keep ``max_bus_message`` under Redis's hard
    ``client-output-buffer-limit pubsub`` (32 MB by default) and ``publish_window`` times the
    number of processes under its soft one (8 MB).
    """

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", *, socket_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        # 0 or less: redis-py times out every read at once, and the start reports Redis
        # unreachable when it is the option that is wrong.
        _check_number("socket_timeout", socket_timeout, float, 0, optional=False, above=True,
                      owner=type(self).__name__)
        self.url = url
        common: dict[str, Any] = {
            "socket_connect_timeout": min(self.connect_timeout, socket_timeout),
            "socket_timeout": socket_timeout,
            "socket_keepalive": True,
        }
        self._redis: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 1), **common)
        self._subscriber: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)

    def _where(self) -> str:
        return _without_password(self.url)

    def _ch(self, channel_id: str) -> str:
        return f"{self.namespace}:ch:{channel_id}"

    def _user(self, user_id: str) -> str:
        return f"{self.namespace}:user:{user_id}"

    def _outbox_keys(self, user_id: str) -> tuple[str, str]:
        """The user's history stream and its meta hash (bytes, last number, written mark)."""
        return f"{self.namespace}:outbox:{user_id}", f"{self.namespace}:outbox-meta:{user_id}"

    def _lease_key(self, user_id: str) -> str:
        return f"{self.namespace}:outbox-lease:{user_id}"

    def _sender_key(self, sender: str) -> str:
        return f"{self.namespace}:outbox-quota:{sender}"

    def _address_key(self, address: str) -> str:
        return f"{self.namespace}:outbox-address:{address}"

    def _window_key(self, slot: str) -> str:
        return f"{self.namespace}:outbox-window:{slot}"

    def _missed_key(self, node_id: str) -> str:
        return f"{self.namespace}:missed:{node_id}"

    def _revoked_key(self, target: str) -> str:
        return f"{self.namespace}:revoked:{target}"

    async def _bus_session(self) -> None:
        loop = asyncio.get_running_loop()
        probe = self.heartbeat_interval
        pubsub = self._subscriber.pubsub()
        try:
            await pubsub.subscribe(self.node_topic, self.broadcast_topic)
            waiting = {self.node_topic.encode(), self.broadcast_topic.encode()}
            last = loop.time()
            while True:
                message = await pubsub.get_message(timeout=probe)
                now = loop.time()
                if message is None:
                    # A quiet bus: PING, and give up if even that gets no answer.
                    if now - last >= 2 * probe:
                        raise BackplaneError("redis: no answer to PING")
                    await pubsub.ping()
                    continue
                last = now
                kind = message["type"]
                if kind == "message":
                    self._on_bus_message(message["data"])
                elif kind == "subscribe" and waiting:
                    waiting.discard(message["channel"])
                    if not waiting:
                        self._bus_up()
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        finally:
            await asyncio.shield(_close_quietly(pubsub))

    async def _close_bus(self) -> None:
        await self._redis.aclose()
        await self._subscriber.aclose()

    def _batch_calls(self, batch: Sequence[Publication],
                     ) -> Iterator[tuple[str | None, tuple[Any, ...]]]:
        """Each publication as (script, its arguments), or (None, PUBLISH's arguments)."""
        prefix = self.topic_of("")
        ledger_ttl = int(max(60.0, 10 * self.expiry) * 1000)  # a dead node's ledger goes too
        for publication in batch:
            if publication.ack is not None:
                user = str(publication.user_id)
                stream, meta = self._outbox_keys(user)
                yield _SETTLE, (3, meta, self._lease_key(user), stream, "", publication.ack,
                                self._window_key(""))
            elif publication.topic is not None:
                if publication.durable is None:
                    yield None, (publication.topic, publication.data)
                else:  # a revocation: recorded as it is published
                    target, code, reason, when = publication.durable  # type: ignore[misc]
                    yield _REVOKE, (1, self._revoked_key(target), int(self.revoke_ttl * 1000),
                                    int(code), reason, publication.topic, publication.data,
                                    when)
            elif publication.user_id is not None:
                keep, user = publication.keep, publication.user_id
                common = (self.node_id, prefix, publication.data, self._missed_key(""), user,
                          ledger_ttl, self._ch(""))
                if keep is None:
                    yield _ROUTE_USER, (1, self._user(user), *common)
                else:
                    sender, address = publication.sender, publication.address
                    yield _ROUTE_USER, (3, self._user(user), *self._outbox_keys(user), *common,
                                        keep.max_messages, keep.max_bytes,
                                        int(keep.max_age * 1000),
                                        "" if sender is None else self._sender_key(sender),
                                        keep.sender_messages, self._window_key(""),
                                        keep.max_users, keep.max_total_bytes,
                                        "" if address is None else self._address_key(address),
                                        *_kid(publication, self.kid_scope))
            else:
                yield _ROUTE, (1, self._ch(str(publication.channel_id)), self.node_id, prefix,
                               publication.data)

    async def _publish_batch(self, batch: Sequence[Publication]) -> list[Routed]:
        # One pipeline per batch, the scripts called by their SHA1 (EVALSHA: neither their text
        # sent nor hashed again per message). A server that does not know them (restarted,
        # flushed) runs none of them (NOSCRIPT before any effect): those are sent again with
        # their text, which caches them, in their order (plain PUBLISHes of the batch went first).
        calls = list(self._batch_calls(batch))
        pipe = self._redis.pipeline(transaction=False)
        for script, args in calls:
            if script is None:
                pipe.publish(*args)
            else:
                pipe.evalsha(_SHA1[script], *args)
        try:
            replies = await pipe.execute(raise_on_error=False)
            unknown = [(i, script, args) for i, (reply, (script, args))
                       in enumerate(zip(replies, calls, strict=True))
                       if isinstance(reply, NoScriptError) and script is not None]
            if unknown:
                retry = self._redis.pipeline(transaction=False)
                for _, script, args in unknown:
                    retry.eval(script, *args)
                for (i, _, _), reply in zip(unknown, await retry.execute(raise_on_error=False),
                                            strict=True):
                    replies[i] = reply
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):  # fails its publication only: the others ran
                self._refused(batch, replies)
        return self._results(batch, replies)

    def _results(self, batch: Sequence[Publication], replies: list[Any]) -> list[Routed]:
        results: list[Routed] = []
        for publication, reply in zip(batch, replies, strict=True):
            if publication.ack is not None:
                results.append((None, -1))
            elif publication.user_id is not None and isinstance(reply, bytes | str):
                # Appended to the user's history: "<id> <n> <receivers>".
                where, _, count = _text(reply).rpartition(" ")
                receivers = int(count)
                results.append((where, receivers if receivers else -1))
            elif publication.user_id is not None and isinstance(reply, list):
                # Refused by a bound of the outbox: {receivers, "sender", "bytes" or "users", ms}.
                self._outbox_refused(publication.sender, _text(reply[1]), max(int(reply[2]), 0),
                                     publication.address, str(publication.user_id))
                results.append((None, int(reply[0])))
            elif publication.channel_id is None:  # a topic or a user: a count
                results.append((None, int(reply)))
            elif reply is None:
                results.append((None, -1))
            else:
                results.append((_text(reply[0]), int(reply[1])))
        return results

    def _refused(self, batch: Sequence[Publication], replies: list[Any]) -> None:
        """Redis answered some publications with an error (a key of the wrong type, ``OOM`` at
        ``maxmemory``...), and ran the others: raise ``BatchRefused`` with every result, so
        that only the refused ones fail (or wait in the spool). An error that says Redis cannot
        take anyone's writes for now (out of memory, loading, a replica, busy...) counts no try
        against them."""
        errors: dict[int, BackplaneError] = {}
        passing = False
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                errors[i] = BackplaneError(f"redis: {reply}")
                passing = passing or (isinstance(reply, _PASSING)
                                      or str(reply).startswith(_PASSING_CODES))
                replies[i] = None if batch[i].channel_id is not None else 0  # a stand-in
        raise BatchRefused(self._results(batch, replies), errors, counted=not passing)

    async def _user_entries(self, user_id: str) -> dict[str, str]:
        key = self._user(user_id)
        try:
            fields = await self._redis.hgetall(key)
            if not fields:
                return {}
            entries = {_text(c): _text(n) for c, n in fields.items()}
            owners = await self._redis.mget([self._ch(c) for c in entries])
            live = {c: n for (c, n), owner in zip(entries.items(), owners, strict=True)
                    if owner is not None and _text(owner) == n}
            stale = [c for c in entries if c not in live]
            if stale:
                await self._redis.hdel(key, *stale)
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        return live

    async def _attach(self, channel_id: str, user_id: str, limit: int | None,
                      keep: OutboxLimits | None) -> tuple[bool, list[Kept], Kept | None]:
        args: list[Any] = [self.node_id, int(self.expiry * 1000), -1 if limit is None else limit,
                           self._ch(""), channel_id, self.topic_of("")]
        if keep is not None:
            args.append(int(keep.max_age * 1000))
        try:
            reply = await self._redis.eval(_ATTACH, 5, self._ch(channel_id), self._user(user_id),
                                           self._outbox_keys(user_id)[0],
                                           self._lease_key(user_id),
                                           self._outbox_keys(user_id)[1], *args)
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        if not int(reply[0]):
            return False, [], None
        newest = _text(reply[1])
        return True, _triples(reply[3:]), (newest, int(reply[2]), b"") if newest else None

    async def _history(self, user_id: str, after: str | None,
                       keep: OutboxLimits) -> tuple[list[Kept], int]:
        try:
            reply = await self._redis.eval(
                _HISTORY, 2, *self._outbox_keys(user_id), after or "", keep.max_messages,
                int(keep.max_age * 1000))
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        return _triples(reply[1:]), int(reply[0])

    async def _settle_outbox(self, user_id: str, channel_id: str, upto: str | None) -> None:
        try:
            stream, meta = self._outbox_keys(user_id)
            await self._redis.eval(_SETTLE, 3, meta, self._lease_key(user_id), stream,
                                   f"{self.node_id}\n{channel_id}", upto or "",
                                   self._window_key(""))
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc

    async def _held_by(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        topics = sorted({self.topic_of(node) for _, node in pairs})
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.mget([self._ch(channel_id) for channel_id, _ in pairs])
            pipe.pubsub_numsub(*topics)
            holders, counts = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        listening = {_text(topic) for topic, count in counts if int(count) > 0}
        return [holder is not None and _text(holder) == node and self.topic_of(node) in listening
                for (_, node), holder in zip(pairs, holders, strict=True)]

    async def _revocations(self, targets: Sequence[str]) -> tuple[list[Revocation | None], int]:
        found: list[Revocation | None] = []
        seconds = micros = 0
        try:
            for start in range(0, len(targets), _BATCH):
                pipe = self._redis.pipeline(transaction=False)
                pipe.mget([self._revoked_key(t) for t in targets[start:start + _BATCH]])
                pipe.time()
                values, (seconds, micros) = await pipe.execute()
                found += [None if v is None else _revocation(_text(v)) for v in values]
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        return found, int(seconds) * 1000 + int(micros) // 1000

    async def _bus_clock(self) -> int:
        try:
            seconds, micros = await self._redis.time()
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        return int(seconds) * 1000 + int(micros) // 1000

    async def _take_missed(self) -> dict[str, int]:
        key = self._missed_key(self.node_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(key)
                pipe.delete(key)
                fields, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc
        return {_text(user): int(count) for user, count in fields.items()}

    async def _write_directory(self, present: Sequence[Entry], absent: Sequence[Entry]) -> None:
        node, ttl = self.node_id, int(self.expiry * 1000)
        users: dict[str, dict[str, str]] = {}
        commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        for channel_id, user_id in present:
            commands.append(("set", (self._ch(channel_id), node), {"px": ttl}))
            if user_id is not None:
                users.setdefault(user_id, {})[channel_id] = node
        for user_id, fields in users.items():
            commands.append(("hset", (self._user(user_id),), {"mapping": fields}))
            commands.append(("pexpire", (self._user(user_id), ttl), {}))
        for channel_id, user_id in absent:
            commands.append(("delete", (self._ch(channel_id),), {}))
            if user_id is not None:
                commands.append(("hdel", (self._user(user_id), channel_id), {}))
        try:
            for start in range(0, len(commands), _BATCH):
                pipe = self._redis.pipeline(transaction=False)
                for name, args, kwargs in commands[start:start + _BATCH]:
                    getattr(pipe, name)(*args, **kwargs)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackplaneError(f"redis: {exc}") from exc


def _triples(flat: Sequence[Any]) -> list[Kept]:
    """``[id, n, message, id, n, message...]`` -> ``[(id, n, message)...]``."""
    return [(_text(flat[i]), int(flat[i + 1]), bytes(flat[i + 2]))
            for i in range(0, len(flat) - 2, 3)]


def _kid(publication: Publication, scope: str) -> tuple[int | str, ...]:
    """A kept message's number and its node's scope for numbers as the script's last
    arguments (none without)."""
    kid = publication.kid
    return () if kid is None else (kid, scope)


def _revocation(value: str) -> Revocation | None:
    """``"<ms> <code> <reason>"`` -> ``(ms, code, reason)`` (``None`` if malformed)."""
    when, _, rest = value.partition(" ")
    code, _, reason = rest.partition(" ")
    try:
        return int(when), int(code), reason
    except ValueError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):  # the connection may be gone; closing is best effort
        await pubsub.aclose()
