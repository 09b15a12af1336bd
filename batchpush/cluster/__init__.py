"""One plan on a Dask cluster (``batchpush run PLAN --scheduler tcp://HOST:PORT``).

Imported only with ``--scheduler``: a local run never imports dask.

The design: each blob of the batch belongs to one Dask task, so that Dask's own
rule — a task runs once (again elsewhere only if its worker dies first) — is the
cluster's single-flight, rather than a coordinator actor of ours that every
upload would ask (one more round trip per blob, and one more thing to lose with
a worker). The client (the machine that
runs ``batchpush run``) expands the plan as the local engine does (it reads the
sources' manifests and configs, never their layers), reads the credentials and
its metadata store, and submits:

- *blob tasks*: each distinct blob of the batch (a layer or an image config,
  known by the digest its source declares) belongs to exactly one, that of the
  first group of repositories in plan order that needs it (one task per blob
  would pay a task's overhead for a 30 KB layer). On a worker it prepares each blob — an
  uncompressed layer is compressed there, the only compression of it in the
  cluster — then, for each target registry that needs it, puts it in the first
  repository of that registry the plan names: it mounts from a repository the
  store knows, or uploads (a task run again asks the registry first, HEAD). One task
  serves every registry rather than a compress task plus an upload task per
  registry: the compressed bytes stay on that worker's spool, never moved
  between workers and never compressed again.
- a *repository task* per group of whole target repositories (a few groups
  per worker thread: a task's fixed cost, its engine, store, connections and
  round trips, is paid for many small images), submitted once the blob tasks
  of its images ended, their (small) results handed over by the client: a
  worker never fetches a result from another, so a worker that dies is never
  waited for and its finished tasks are not run again (Dask would, for a
  result still wanted). A worker's Engine pushes the repositories' images
  exactly as a local run does, its store seeded with what the blob tasks
  learned, by way of the client's store (their fingerprints: nothing is read or
  compressed again; their DiffID → digest entries) and its push state with where each blob now is: the
  blob's first repository needs no request, every other one mounts it from
  there, once (the repository's images share that push state). The manifest
  goes only once every blob it names is in the repository (the engine's rule).

Dask may run a task twice (its worker died after finishing it): every task is
idempotent. A blob task run again (each attempt notes its start in a Dask Event
named after the task) asks the registry before writing each blob, so it uploads
nothing the lost attempt committed; a mount of a present blob is a 201; a manifest
PUT of the same bytes changes nothing. Workers are stateless: each task has a
temporary store, seeded by the client with what its own store knows of the
task's blobs, and returns what it learned, which the client adds to its store:
the next run, local or clustered, mounts and takes the cron fast path. In a
re-run, an image whose target the client's store says it pushed to before is
first checked by the client itself, as a local run does (one tag HEAD, nothing
compressed); only images not up to date get blob tasks.

Per-registry concurrency is cluster-wide: a blob task holds a
``distributed.Semaphore`` named after the run and the registry (``max_concurrent_uploads``
leases) while it writes a blob of SMALL_BODY_BYTES or more there (a smaller
one takes no upload slot in a local run either). Credentials are read on the client and travel
inside the tasks' arguments in an object whose repr hides them; task keys are a
run id and hashes, never a name or a secret.

Registry sources (``docker://``): their images are first checked by the client
(the source's and the target's tag HEADs, the mirror's cron fast path, as a local
run does); for those to copy, the client reads the manifests (the sources'
manifests are what the client reads of local sources too), so their blobs join
the blob tasks like any other: streamed from the source by the worker, or mounted
from the source repository on its own registry. The repository task's engine gets
the manifests and the tag's digest the client read (``_Push.resolved``), so the
source is not asked again, and copies them with their attachments as a local run
does. Pruning entries run on the client at the end (a tag list, a DELETE per tag).
A dry run writes nothing: the CLI runs it on the client alone.

Every wait of the client on the cluster has a bound and looks at the run's stop.
The client polls the workers every RELAY_INTERVAL_S (``_Watch``, ``_poll``): which
of its tasks they run, and their progress events. A task not heard of for
TASK_SILENCE_S (no worker running it while the run is otherwise silent, or its
result not handed over once Dask says it is done) is given up and tried once more
by a task of its own (on the workers that answer the client's polls, if one does
not), then its images fail with a line that names the task and the cluster; the
run ends with its report.

Nothing a run makes outlives it on a long-lived cluster, a stopped or failed run's
included (``_ClusterRun.close``): its progress never passes through the scheduler
(whose event log keeps every topic it is given), its attempt notes (Dask Events)
and upload leases (Semaphores) are deleted, the workers forget it, the client's
close releases its futures.

A stop (SIGINT, SIGTERM: ``Interrupted``) reaches every worker (``_stop_run``):
the run's task engines cancel as a local engine does, and the client reports each
image it has no result for as interrupted.

The package, by side: ``client`` (what runs on the client), ``tasks`` (what runs in
a task, on a worker), ``relay`` (the progress relay between them), ``common`` (the
settings, errors and values both sides share).
"""

from __future__ import annotations

from .client import Interrupted, connect, run
from .common import CONNECT_TIMEOUT_S, TASK_SILENCE_S, ClusterError, ClusterTimeout
from .common import _lost as _lost  # the tests reach these through the package
from .common import _Secrets as _Secrets
from .common import _Setup as _Setup
from .tasks import _TaskEngine as _TaskEngine

__all__ = ["CONNECT_TIMEOUT_S", "TASK_SILENCE_S", "ClusterError", "ClusterTimeout", "Interrupted", "connect", "run"]
