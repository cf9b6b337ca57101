"""The service's life cycle, which is not HTTP: the listening socket (bound first, or
passed by systemd), what systemd is told (readiness, status, reloads, the watchdog), and
the service that starts the pool, serves HTTP on top of it and drains on a signal."""
