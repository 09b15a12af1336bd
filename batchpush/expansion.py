"""Plan entries expanded into pushes concurrently, a bounded window ahead of them.

Expanding a ``docker://`` entry costs a tag list (a round trip, more for pages);
behind a far registry, listing repositories one after another is the whole run.
So up to ``width`` jobs are expanded at once, each on a thread of its own, and
every job's works are handed on as soon as that job is expanded (the order jobs
finish in), while the next ones are still being listed. Nothing runs further
ahead than that: a new job is taken from the plan only when the consumer asks for
the next work and fewer than ``width`` are being expanded, so a consumer that
waits (its bounded queue of pushes is full) stops the listing too, and memory
stays flat for a plan of any size. The plan's jobs are taken lazily, on the
consumer's thread: an iterator that lists a catalog as it goes (one job per
repository) is read as it is consumed.

Each work comes with a key, ``(job's position, work's position in its job)``,
that sorts in plan order: the consumer puts its results back into the plan's
order once they are in.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from .waits import POLL_S

J = TypeVar("J")
W = TypeVar("W")

#: where a work sorts in the plan: (its job's position, its own in the job)
Key = tuple[int, int]


class Expansion(Generic[J, W]):
    """Iterates ``(key, work)`` for every work of ``jobs``, at most ``width`` jobs
    expanded at once on threads of its own; see the module docstring.

    ``expand(job, position)`` runs on those threads: it must not raise (a job
    that cannot be expanded gives works that carry their error); an exception it
    raises anyway is raised here, as one from the plan's iterator is. Once
    ``cancel`` is set no job is started and iteration ends."""

    def __init__(self, jobs: Iterable[J], expand: Callable[[J, int], Sequence[W]], *, width: int, cancel: threading.Event) -> None:
        if width < 1:
            raise ValueError(f"width must be at least 1, not {width}")
        self._jobs = jobs
        self._expand = expand
        self.width = width
        self._cancel = cancel
        #: the most jobs that were being expanded at once
        self.peak = 0

    def __iter__(self) -> Iterator[tuple[Key, W]]:
        pool = cf.ThreadPoolExecutor(max_workers=self.width, thread_name_prefix="expand")
        #: the jobs being expanded, by their position in the plan
        running: dict[cf.Future[Sequence[W]], int] = {}
        jobs = iter(self._jobs)
        taken = 0

        def start() -> None:
            """Jobs started until ``width`` are being expanded or none is left."""
            nonlocal jobs, taken
            while len(running) < self.width and not self._cancel.is_set():
                job = next(jobs, _END)  # may be a request (a catalog's next page): no lock is held
                if job is _END:
                    jobs = iter(())
                    return
                running[pool.submit(self._expand, job, taken)] = taken  # type: ignore[arg-type]
                taken += 1
                self.peak = max(self.peak, len(running))

        try:
            while True:
                start()
                if not running or self._cancel.is_set():
                    return
                done, _ = cf.wait(running, timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    position = running.pop(future)
                    for index, work in enumerate(future.result()):
                        yield (position, index), work
                        start()  # a job of many works keeps the window full while it is handed on
        finally:
            # on the normal path nothing is left; after a cancel or an error, a job
            # still listing ends on its own (its requests look at the cancel flag)
            pool.shutdown(wait=False, cancel_futures=True)


_END = object()
