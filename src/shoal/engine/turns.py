"""Compute turns shared by the engines of one process, while an encoder model is loaded.

Each engine steps on its own thread, and each step asks torch for every core. A decoder
stepping while an encoder runs a pass beside it gets half the cores: its streams' gaps
between tokens double. Taking turns (first come, first served) keeps every step at full
speed; while a decoder waits for its turn, the encoder sizes its pass to half the decoder's
latest step (EncoderCore), so a stream's gap grows by at most half, not by a whole batch.
The encoder keeps its passes that short whenever a decoder has streams, not only when it
already waits: between two of its steps a decoder hands out tokens without holding a turn,
and an encoder that took that moment for a full pass made the stream wait all of it.

Only engaged while an encoder is loaded: decoder engines alone keep running side by side as
before.
"""
from __future__ import annotations

import threading
from typing import Self


class Turns:
    """A FIFO lock with a count of who is waiting (tickets, so no thread can take two turns
    in a row while another waits)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self.encoders = 0            # loaded encoder engines; 0: turns are not taken
        self.last_decoder_seconds = 0.0   # how long the latest decoder step took
        self._busy_decoders: set[int] = set()   # ids of decoder engines with unfinished requests

    @property
    def engaged(self) -> bool:
        return self.encoders > 0

    @property
    def others_waiting(self) -> bool:
        """Whether another thread waits for a turn (read by the thread holding one)."""
        return self._next_ticket - self._serving > 1

    @property
    def decoders_busy(self) -> bool:
        """Whether a decoder engine has streams to serve (its next step is coming)."""
        return bool(self._busy_decoders)

    def decoder_busy(self, engine: object, busy: bool) -> None:
        if busy:
            self._busy_decoders.add(id(engine))
        else:
            self._busy_decoders.discard(id(engine))

    def __enter__(self) -> Self:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


ENGINE_TURNS = Turns()
