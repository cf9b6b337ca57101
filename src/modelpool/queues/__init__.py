"""Where jobs wait: the queue interface, the in-process queue and the Redis Streams queue."""
