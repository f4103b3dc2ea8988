"""The backplane: the same manager calls reach channels connected to other server processes.

A manager with no backplane keeps everything in its own process; that is the default and costs
nothing. Several processes behind a load balancer share a *bus* (Redis, see ``dara_ws_redis``)
through a backplane each::

    backplane = RedisBackplane("redis://127.0.0.1:6379/0")
    manager = WebsocketManager(config, backplane=backplane)
    await backplane.start(manager)     # subscribe, register this process's channels
    ...
    await endpoint.shutdown()          # close the clients first: their removals are published
    await backplane.stop()

Then ``send_message``, ``broadcast``, ``send_message_to_user`` and ``send_and_wait`` reach every
channel of the cluster, and ``await manager.get_all_user_channels(user_id)`` sees them all (the sync
``get_user_channels`` stays local: it cannot wait for the bus).

Design (what :class:`BrokerBackplane` implements over any bus):

* **Route by interest.** Each process (a *node*) subscribes to its own topic
  (``<namespace>:node:<node_id>``) and to one broadcast topic. A directory in the bus maps
  channel -> node and user -> {channel: node}; a message for a channel is published once, to the
  topic of the node holding it, so a process receives only what is meant for its clients (plus
  broadcasts), never every message of the cluster.
* **Encode once.** The manager encodes a frame once; the backplane prefixes a small routing header
  and publishes that one ``bytes`` object (once per destination node for a user's channels); the
  receiving node hands one ``bytes`` object to all of its recipients' queues.
* **Pipelined.** Everything a node publishes goes through one ordered outbox that a single task
  drains in batches (one bus round trip per batch, not per message), so messages from one
  process leave in the order its calls made them. A message for a channel is looked up and
  published in one step (one round trip on Redis: a small script).
* **Expiry, not goodbyes.** Directory entries carry an expiry that a heartbeat refreshes, so a
  process that dies leaves nothing registered beyond ``expiry`` seconds. Directory writes never
  block a connection: ``channel_added`` / ``channel_removed`` queue a change, one background task
  writes them in batches (:meth:`BrokerBackplane.flush` waits for them).
* **Requests across processes.** ``send_and_wait`` to a remote channel encodes the request once,
  with an unpredictable ``__rchan`` that is also the request's id, and publishes it to the owning
  node, which hands those bytes to the channel as they are (never decoded and re-encoded), waits
  for the client's answer as a local ``send_and_wait`` does and publishes the answer, or the
  failure (timeout, connection closed, chunk error...), to the asking node's topic; the asker
  raises the same exception it would for a local channel. A disconnecting client fails the
  request at once, as locally.
* **Faults.** When the bus is unreachable, local delivery keeps working; messages for other
  processes are counted in ``stats.failed`` and logged (once when the outage starts and once, with
  the count, when it ends), never silently dropped. Fan-out calls (``broadcast``,
  ``send_message_to_user``) do not raise for that; single-recipient calls (``send_message`` to a
  remote channel, ``send_and_wait``) raise :class:`~dara_ws_core.exceptions.BackplaneError`.
  Waiting requests fail at once with ``BackplaneError`` when the bus connection is lost (their
  answers could be lost too). The connection is retried with exponential backoff and jitter; once
  back, the node resubscribes and re-registers every channel it holds.
* **Gaps.** With the per-user outbox on, every per-user message is appended to the user's
  history on the bus as it is published, carrying the entry's id; each node remembers the last
  entry it handed to each local user. After a lost subscription it reads each local user's
  history after that entry and hands over what it missed, in order, before the deliveries held
  back meanwhile (each entry once). What a bound dropped first is reported (``stats.lost``, the
  log, the manager's ``on_gap(user_id, Gap)``), as are broadcasts missed (per-publisher
  sequence numbers: broadcasts and per-channel sends are at most once) and, with the outbox
  off, the per-user sends a per-node gap ledger counted.

The package, bottom up (modules never import the manager; the manager implements
:class:`BackplaneHost`, the only way a backplane reaches it):

* ``contract``: :class:`Backplane` (what the manager calls), :class:`BackplaneHost` (what a
  backplane may ask of the manager: deliver to local targets, run a relayed request, list its
  channels), :class:`BackplaneStats`, and remote failures (:func:`failure_of` / :func:`error_of`).
  Pure.
* ``wire``: the bus wire format, :func:`encode_bus_message` / :func:`decode_bus_message`: one
  compact JSON header, a newline, then the body (a client frame exactly as the sending process
  encoded it, or a JSON answer). Pure.
* ``node``: :class:`BusNode`, a process on a bus: connection with backoff, the ordered outbox.
* ``broker``: :class:`BrokerBackplane`, the routing, requests and directory upkeep.
* ``memory``: :class:`MemoryBroker` + :class:`MemoryBackplane`, the in-process bus: several
  managers in one process sharing a broker behave like several processes sharing Redis (same
  routing code, same failure handling), which makes fast, deterministic tests possible.
"""

from __future__ import annotations

__all__ = [
    "Attachment",
    "Backplane",
    "BackplaneHost",
    "BackplaneStats",
    "BroadcastDelivery",
    "BrokerBackplane",
    "BusMessage",
    "BusNode",
    "BusOptions",
    "ChannelDelivery",
    "Control",
    "Entry",
    "Failure",
    "Gap",
    "GapCallback",
    "MemoryBackplane",
    "MemoryBroker",
    "Publication",
    "RemoteCancel",
    "RemoteReply",
    "RemoteRequest",
    "Routed",
    "SequenceTracker",
    "UserDelivery",
    "decode_bus_message",
    "encode_bus_message",
    "error_of",
    "failure_of",
]

from .broker import BrokerBackplane
from .contract import (
    Attachment,
    Backplane,
    BackplaneHost,
    BackplaneStats,
    Failure,
    Gap,
    GapCallback,
    error_of,
    failure_of,
)
from .memory import MemoryBackplane, MemoryBroker
from .node import BusNode, BusOptions, Entry, Publication, Routed
from .wire import (
    BroadcastDelivery,
    BusMessage,
    ChannelDelivery,
    Control,
    RemoteCancel,
    RemoteReply,
    RemoteRequest,
    SequenceTracker,
    UserDelivery,
    decode_bus_message,
    encode_bus_message,
)
