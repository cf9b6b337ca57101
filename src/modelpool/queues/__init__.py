"""Where jobs wait: the queue interface, the in-process queue and the Redis Streams queue.

base.py    JobQueue, the interface the pool sees, and the protocols of what a queue
           uses of the pool
local.py   LocalQueue, one memory channel in this process (the default)
redis/     RedisQueue, a Redis stream shared by the nodes of a cluster
open.py    open_queue, which picks one from the configuration

Nothing here imports the pool; base.py and local.py import nothing of redis/, and
open.py imports redis/ (with coredis) only for a redis:// queue.
"""
