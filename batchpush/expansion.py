"""Plan entries expanded into pushes concurrently, a bounded window ahead of them.

Expanding a ``docker://`` entry costs a tag list (a round trip, more for pages);
behind a far registry, listing repositories one after another is the whole run.
So up to ``width`` jobs are expanded at once, each on a thread of its own, and
every job's works are handed on as soon as that job is expanded (the order jobs
finish in), while the next ones are still being listed. Nothing runs further
ahead than that: a new job is taken from the plan only when the consumer asks for
the next work and fewer than ``width`` are being expanded, so a consumer that
waits (its bounded queue of pushes is full) stops the listing too, and memory
stays flat for a plan of any size.

Each work comes with a key (a tuple of ints) that sorts in plan order: the
consumer puts its results back into the plan's order once they are in.

A job may stand for more jobs (issue 22: a catalog source, one job per
repository it lists): its ``Expanded.jobs`` are expanded in turn, in the same
window, before the plan's next entries, and taken lazily (a catalog of any size
is read as it is consumed). Their works' keys sort after their parent's own works.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .waits import POLL_S

J = TypeVar("J")
W = TypeVar("W")

#: where a work sorts in the plan: its job's position (each level of jobs a job
#: stands for adds two), then its own within the job
Key = tuple[int, ...]
_OWN, _STANDS_FOR = 0, 1


@dataclass(frozen=True, slots=True)
class Expanded(Generic[J, W]):
    """What expanding one job gave."""

    #: its works, in the job's own order
    works: Sequence[W] = ()
    #: jobs it stands for (a catalog's repositories), expanded in turn, taken lazily
    jobs: Iterator[J] | None = None


class Expansion(Generic[J, W]):
    """Iterates ``(key, work)`` for every work of ``jobs``, at most ``width`` jobs
    expanded at once on threads of its own; see the module docstring.

    ``expand(job, key)`` runs on those threads: it must not raise (a job that
    cannot be expanded gives works that carry their error); an exception it
    raises anyway is raised here, as one from the plan's iterator is. Once
    ``cancel`` is set no job is started and iteration ends."""

    def __init__(self, jobs: Iterable[J], expand: Callable[[J, Key], Expanded[J, W]], *, width: int, cancel: threading.Event) -> None:
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
        #: the jobs being expanded, and their keys
        running: dict[cf.Future[Expanded[J, W]], Key] = {}
        #: where the next jobs come from, innermost last: (its key prefix, its jobs, how many taken)
        sources: list[tuple[Key, Iterator[J], list[int]]] = [((), iter(self._jobs), [0])]

        def start() -> None:
            """Jobs started until ``width`` are being expanded or none is left."""
            while len(running) < self.width and sources and not self._cancel.is_set():
                prefix, jobs, taken = sources[-1]
                job = next(jobs, _END)  # may be a request (a catalog's next page): no lock is held
                if job is _END:
                    sources.pop()
                    continue
                key = (*prefix, taken[0])
                taken[0] += 1
                running[pool.submit(self._expand, job, key)] = key  # type: ignore[arg-type]
                self.peak = max(self.peak, len(running))

        try:
            while True:
                start()
                if not running or self._cancel.is_set():
                    return
                done, _ = cf.wait(running, timeout=POLL_S, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    key = running.pop(future)
                    expanded = future.result()
                    if expanded.jobs is not None:
                        sources.append(((*key, _STANDS_FOR), expanded.jobs, [0]))
                    for index, work in enumerate(expanded.works):
                        yield (*key, _OWN, index), work
                        start()  # a job of many works keeps the window full while it is handed on
        finally:
            # on the normal path nothing is left; after a cancel or an error, a job
            # still listing ends on its own (its requests look at the cancel flag)
            pool.shutdown(wait=False, cancel_futures=True)


_END = object()
