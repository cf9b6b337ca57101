"""trio, where modelpool leans on what trio does without documenting it: in this one
module, so that a new trio is read against it; tests/test_seams.py checks each still holds.
(`trio.lowlevel`, which the service uses too, is trio's public API, and needs no seam.)

- A closed stream's descriptor is `CLOSED` (-1): trio's `FdStream.fileno()` once the
  stream is closed (trio's holder of the descriptor sets it), and a trio socket's
  `fileno()` once it is closed (the standard library's socket's). core/eagerio.py looks
  the descriptor up at every read and write, and takes `CLOSED` for a stream closed
  meanwhile: never a read or write of a number the system may already have given to
  another file. The keep-alive timer (http/keepalive.py) looks at a client's socket
  the same way.
"""

from __future__ import annotations

CLOSED = -1  # the descriptor a closed trio stream or socket gives
