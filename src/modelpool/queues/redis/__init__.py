"""The job queue as a Redis (or Valkey) stream, shared by every node of a cluster.

One stream holds the jobs, in arrival order, read by one consumer group: an idle
worker on any node asks for one entry (`XREADGROUP ... COUNT 1 BLOCK`), so the oldest
job goes to the first free model anywhere. The entry stays pending until the worker
has answered (`XACK`, then `XDEL`, so the stream holds only jobs not yet answered).

A job carries its caller's node, its request id, the line for the model, how many
times it was taken, and its deadline: the wall-clock time by which a model must take
it. A worker that takes it later answers 503 and does not run it. Every answer goes to
the stream of replies of the caller's node, read by one task there that hands each to
its waiting request. A worker also tells the caller when it takes the job, so the
caller's queue timeout works as on one machine.

A node that dies mid-job leaves its entries pending. Live nodes refresh their pending
entries every second (`XCLAIM ... JUSTID` resets their idle time), so an entry idle
for `reclaim_after` seconds belongs to a dead node: any live node claims it
(`XAUTOCLAIM`) and queues it once more if it is still within its deadline and was
taken only once, as a local model that died before reading its request; otherwise its
caller gets 502. Only its own callers' answers are lost when a front dies: its replies
stream expires.

Every node writes a heartbeat (its workers' states) into one hash every second, so
any front's /status and /metrics show every node. Writes from workers (notices,
answers, acknowledgements) go through one outbox task, batched into pipelines, so a
worker never waits on the network to settle a job.

The modules, by role (each imports only those above it in this list):
  url.py         what a Redis queue URL may say; whether the client is installed
                 (the standard library only: see queues/backends.py)
  wire.py        keys, fields and their encoding: everything nodes share, checked
  scripts.py     the Lua scripts: what must happen at once on the server
  server.py      the client, the server's health (up/down), mending a lost group
  remote.py      RemoteJob: a job read from the stream, whose answer goes back
  outbox.py      the writes workers ask for, one record per kind, sent in pipelines
  caller.py      put, wait, abandon; the reader of this node's replies
  consumer.py    get, claim, requeue: this node's workers in the group
  membership.py  heartbeats, lost entries, reclaims, the cluster's status
  queue.py       RedisQueue: the parts behind the JobQueue interface

Its modules but url.py import coredis: only `open_queue` imports them, and only for a
redis:// queue.
"""
