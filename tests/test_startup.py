"""Start-up: a run imports what it uses when it uses it.

Each case runs the CLI in a fresh interpreter and lists the modules it loaded (its
``sys.modules`` at the end): ``--version`` loads none of the run's, and a one-image
push through a pipe (no terminal, no plan, no metrics, no cluster) loads no live
display, no YAML, no Prometheus client and no Dask. The time this saves is measured
in bench/startup.py, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from images import simple_layout

#: what a run loads only when asked: the live display (a terminal), PyYAML (a plan),
#: prometheus-client (metrics), Dask (--scheduler)
ONLY_WHEN_ASKED = ("rich", "yaml", "prometheus_client", "dask", "distributed", "batchpush.plan", "batchpush.cluster")
#: what a run never loads: requests, urllib3 and http.client (the client speaks HTTP
#: itself: registry/transport.py), the email package (http.client's header parser),
#: and certifi's bundle when no registry is verified (here: an --insecure one)
NEVER = ("requests", "urllib3", "http.client", "email", "charset_normalizer", "idna", "certifi")
#: what a push from an OCI layout to a registry, with nothing to select, prune or
#: run, does not load: tag selection by version, docker archives (tarfile), OCI
#: layout targets, pruning, dry runs, metrics, credential helpers, proxies
NOT_THIS_RUN = (
    "semantic_version",
    "tarfile",
    "batchpush.sources.docker_archive",
    "batchpush.layout",
    "batchpush.prune",
    "batchpush.registry.dry_run",
    "batchpush.metrics",
    "subprocess",
    "urllib.request",
)
#: what its re-run does not load besides: it reads no layer, so neither the
#: compressor nor the fingerprint hash, nor ctypes (the heap's setting for the
#: compressed blocks); and its registry, plain HTTP and marked insecure, answered
#: over http last time: no TLS handshake is tried first (no ssl, nor the IDNA codec
#: ssl encodes the server's name with: an ASCII host name is resolved as bytes)
NOT_ON_A_RERUN = ("isal", "xxhash", "ctypes", "ssl", "encodings.idna")
#: what ``--version`` must not load: the engine, the HTTP stack, the database
RUN_MODULES = ("batchpush.engine", "batchpush.registry", "requests", "urllib3", "socket", "sqlite3", "logging", *ONLY_WHEN_ASKED)

_LOADED = """
import json, sys
from batchpush.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


def loaded_by(tmp_path, *args: str) -> tuple[int, set[str]]:
    """The exit code of ``batchpush ARGS`` in a fresh interpreter, its stdout a pipe,
    and the top-level names and packages of the modules it loaded."""
    listing = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", _LOADED, str(listing), *args], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    found = json.loads(listing.read_text())
    return found["code"], set(found["modules"])


def _present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if name in modules or any(m.startswith(name + ".") for m in modules))


def test_version_loads_none_of_the_run(tmp_path):
    code, modules = loaded_by(tmp_path, "--version")
    assert code == 0
    assert "batchpush.cli" in modules  # the listing is the CLI's
    assert _present(modules, RUN_MODULES) == []


def test_version_prints_what_the_parser_would(capsys):
    from batchpush.cli import build_parser, main

    assert main(["--version"]) == 0
    fast = capsys.readouterr().out
    try:
        build_parser().parse_args(["--version"])
    except SystemExit:
        pass
    assert fast == capsys.readouterr().out == f"batchpush {__import__('batchpush').__version__}\n"


def test_one_image_push_and_its_rerun_load_nothing_they_do_not_use(registry, tmp_path):
    simple_layout(str(tmp_path / "layout"), {"1.0": [1]})
    args = ("push", f"oci:{tmp_path}/layout:1.0", f"{registry.host}/lazy/app:1.0", "--insecure", registry.host, "--metadata-dir", str(tmp_path / "md"))
    code, modules = loaded_by(tmp_path, *args)
    assert code == 0
    assert "batchpush.engine" in modules and "batchpush.registry.transport" in modules  # it did run
    assert "ssl" in modules  # the first run tried https first
    assert _present(modules, ONLY_WHEN_ASKED + NEVER + NOT_THIS_RUN) == []
    code, modules = loaded_by(tmp_path, *args)  # the cron re-run: the tag holds the image
    assert code == 0
    assert _present(modules, ONLY_WHEN_ASKED + NEVER + NOT_THIS_RUN + NOT_ON_A_RERUN) == []
