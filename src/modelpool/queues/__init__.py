"""Where jobs wait: the queue interface, the in-process queue and the Redis Streams queue.

base.py      JobQueue, the interface the pool sees, and the protocols of what a queue
             uses of the pool
local.py     LocalQueue, one memory channel in this process (the default)
redis/       RedisQueue, a Redis stream shared by the nodes of a cluster
backends.py  the shared queues by URL scheme: their URLs' checks (registered with
             settings), the client each needs, and how to open one
open.py      open_queue, which opens the one the configuration names

Nothing here imports the pool; base.py and local.py import nothing of redis/, and
backends.py imports of redis/ only its URL check (redis/url.py, the standard library);
the Redis queue, with coredis, is imported only when a redis:// queue is opened.
"""
