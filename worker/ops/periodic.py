"""A daemon thread that does one thing every few seconds while the worker runs."""

from __future__ import annotations

import abc
import logging
import threading

log = logging.getLogger(__name__)


class Periodic(abc.ABC):
    """Calls :meth:`tick` every ``interval_s`` (first at once, or after one interval) until
    :meth:`stop`; a failing tick is logged and the next one tries again."""

    name = "fleet-periodic"

    def __init__(self, interval_s: float, at_start: bool = True) -> None:
        self.interval_s = interval_s
        self.at_start = at_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @abc.abstractmethod
    def tick(self) -> None:
        """The one thing to do each interval."""

    def _run(self) -> None:
        if not self.at_start and self._stop.wait(self.interval_s):
            return
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # Redis restarting, say: the next tick tries again
                log.warning("%s: %s", self.name, exc)
            self._stop.wait(self.interval_s)
