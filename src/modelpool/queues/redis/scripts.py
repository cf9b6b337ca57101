"""The Lua scripts: the steps that must happen at once on the server.

Each one does, in one round trip and with no other client in between, what two
nodes doing it in separate commands could do twice or half: admit a job only while
there is room, count waiting jobs, trim a node's replies, queue a job once more.
`Scripts` holds them registered with one client; a call may go into a pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import coredis
from coredis.commands.script import Script

# Admission and queueing in one step, so two fronts cannot both take the last place:
# waiting jobs are those in the stream that no consumer has been given yet.
ADMIT = """
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""
WAITING = """
return redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
"""
# Trim a node's replies up to the last one it read, if the stream still holds that one;
# false if not: the stream was made anew since, and it must be read from its start.
TRIM_REPLIES = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 1) == 0 then return false end
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
return 1
"""
# A job back into the stream, and its caller told its new entry, in one step. It runs
# only while the old entry is still pending, so sending it twice queues the job once.
# The notice is a reply as wire.read_reply reads it.
REQUEUE = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
redis.call('XDEL', KEYS[1], ARGV[2])
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 6))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'key', ARGV[5], 'kind', 'requeued',
           'entry', id)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""


@dataclass(frozen=True)
class Scripts:
    """The scripts, registered with one client (their SHA is loaded on first use)."""

    admit: Script[bytes]  # KEYS: stream; ARGV: group, max queue, fields...: entry id or nil
    waiting: Script[bytes]  # KEYS: stream; ARGV: group: jobs no consumer was given yet
    trim_replies: Script[bytes]  # KEYS: replies; ARGV: last read: 1, or nil if it is gone
    requeue: Script[bytes]  # KEYS: stream, replies; ARGV: group, entry, maxlen, ttl, key, ...

    @classmethod
    def register(cls, client: coredis.Redis[bytes]) -> Scripts:
        return cls(
            admit=client.register_script(ADMIT),
            waiting=client.register_script(WAITING),
            requeue=client.register_script(REQUEUE),
            trim_replies=client.register_script(TRIM_REPLIES),
        )
