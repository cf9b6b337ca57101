"""A model's result lines: the one awaited goes to the worker, a stale one is dropped.

A result line answers the request the worker awaits a result for, and only that one.
With --id-field, every request carries an id: a result that carries the id of one of
the model's earlier requests (STALE_IDS of them are kept) is stale, an answer to a
request already answered or failed, and is dropped rather than taken for the answer
to the next one. A result nobody awaits, that is not stale, is the model's caller's
problem (`ModelProcess.out_of_step`): `Results.route` says it was not taken.

A model that answers fast (its last answer came within SPIN_FOR) is watched for its
answer for that long before the worker waits (`receive`): the worker yields to the
scheduler and looks again, so the service does not fall asleep in epoll_wait while
the answer is due. Waking a sleeping process takes tens of microseconds, more on a
virtual machine, and a model that prints a few lines per request paid it once per
write. A slower model is never watched so; a fast one costs at most SPIN_FOR of turns
of the scheduler per request (each a few microseconds, and other tasks run in them).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from modelpool.core.codec import result_id
from modelpool.process.pacing import POLL_MAX

STALE_IDS = 64  # ids of its earlier requests a model's results are checked against
SPIN_FOR = 0.001  # seconds a fast model's answer is watched for before the worker sleeps

log = logging.getLogger("modelpool.model")


class Results:
    """Where a model's results go: the awaited one to `receive`, stale ones nowhere.

    `stale_results` counts the results dropped for an earlier request's id, and
    `on_stale` is called for each of them.
    """

    def __init__(self, name: str, id_field: str | None) -> None:
        self.awaiting = False
        self.wire_id: str | None = None  # the id of the request whose result is awaited
        self.stale_results = 0
        self.on_stale: Callable[[], None] | None = None
        self._name = name
        self._id_field = id_field
        self._sent_ids: deque[str] = deque(maxlen=STALE_IDS)
        # The result, after a None if a stale result came first (see receive).
        self._send, self._receive = trio.open_memory_channel[bytes | None](2)
        self._stale_payload = b""  # the last stale result dropped while one was awaited
        self._expected_at = 0.0  # when the awaited result was expected
        self._last_wait = float("inf")  # how long the last awaited result took to come

    def rename(self, name: str) -> None:
        """Its model goes by another name (a --preload template adopted by a worker)."""
        self._name = name

    def expect(self, wire_id: str | None) -> None:
        """The next result answers the request about to be sent, sent with `wire_id`."""
        self.awaiting = True
        self.wire_id = wire_id
        self._stale_payload = b""
        self._expected_at = trio.current_time()
        if wire_id is not None:
            self._sent_ids.append(wire_id)

    def route(self, payload: bytes, waits_visibly: bool, request_id: str | None) -> bool:
        """Take a result line's payload: False if it is neither awaited nor stale.

        `waits_visibly`: whether the model was seen waiting in a read of its stdin;
        `request_id`: the request it computes, for the log.
        """
        if self._sent_ids and (stale := self._stale_id(payload)) is not None:
            self._drop_stale(stale, payload, waits_visibly, request_id)
            return True
        if self.awaiting:
            self.awaiting = False
            self._last_wait = trio.current_time() - self._expected_at
            self._send.send_nowait(payload)
            return True
        return False

    async def receive(self, back_to_reading: Callable[[], bool]) -> bytes:
        """The awaited result; trio.EndOfChannel once the model's output ended.

        A model seen waiting that printed a stale result instead of one for this
        request, and then went back to reading (`back_to_reading`) with nothing else
        printed, will print no other: that stale result is taken for its answer, which
        parse_result refuses for its id (502) instead of the request timing out.
        """
        payload = await self._soon() if self._last_wait < SPIN_FOR else b""
        if payload == b"":  # not come yet
            payload = await self._receive.receive()
        while payload is None:  # a stale result came: watch for the model to be done
            with trio.move_on_after(POLL_MAX):
                payload = await self._receive.receive()
            if payload is None and self._gave_up(back_to_reading):
                return self._stale_payload
        return payload

    async def _soon(self) -> bytes | None:
        """What came within SPIN_FOR of the request, looked for once per turn of the
        scheduler (each turn polls for I/O, and runs the pump when the model wrote);
        b"" if nothing did."""
        give_up = self._expected_at + SPIN_FOR
        while True:
            try:
                return self._receive.receive_nowait()
            except trio.WouldBlock:
                pass
            if trio.current_time() >= give_up:
                return b""
            await trio.lowlevel.checkpoint()

    def _gave_up(self, back_to_reading: Callable[[], bool]) -> bool:
        nothing_routed = self._receive.statistics().current_buffer_used == 0
        return nothing_routed and back_to_reading()

    def close(self) -> None:
        """The model's output ended: `receive` raises trio.EndOfChannel from now on."""
        self._send.close()

    def _stale_id(self, payload: bytes) -> str | None:
        """The id of an earlier request of this model's that a result carries, if it does.

        Only with --id-field, and by the id field itself: the result is parsed for it.
        Its text alone tells nothing: a request may carry any id in its data (the next
        ones are easy to guess), which a model that echoes its request prints back, so
        a stale result may hold the awaited id's text too.
        """
        assert self._id_field is not None
        got = result_id(payload, self._id_field)
        if not isinstance(got, str) or got not in self._sent_ids:
            return None
        if self.awaiting and got == self.wire_id:
            return None
        return got

    def _drop_stale(
        self, stale: str, payload: bytes, waits_visibly: bool, request_id: str | None
    ) -> None:
        """A result for a request already answered (or failed): it answers nothing.

        While a result is awaited from a model seen waiting, the worker is told (a
        None, once), so it can tell when the model has given up on answering.
        """
        self.stale_results += 1
        if self.on_stale is not None:
            self.on_stale()
        if self.awaiting and waits_visibly:
            if not self._stale_payload:
                self._send.send_nowait(None)
            self._stale_payload = payload
        if self.awaiting:
            log.warning(
                "%s printed a stale result (id %s, of an earlier request) while awaiting "
                "the result of request %s (id %s); dropped",
                self._name,
                stale,
                request_id,
                self.wire_id,
            )
        else:
            log.warning(
                "%s printed a stale result (id %s, of an earlier request) while no result "
                "was awaited; dropped",
                self._name,
                stale,
            )
