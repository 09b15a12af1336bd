"""A service user: ``nobody``, whose home is not writable.

The tests run as root; these run batchpush as ``nobody`` (setpriv drops the uid,
the gid and the groups), with ``HOME=/nonexistent`` as a systemd ``DynamicUser`` or
a pod with a read-only root file system has it. The venv's interpreter lies under
root's home, which ``nobody`` may not be able to enter: the run then uses the
system's Python of the same version; the venv's packages are on its path. Pushes go to the real
registry; skopeo reads back what arrived.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from conftest import pull_and_verify
from images import simple_layout

from batchpush.digest import Digest
from batchpush.metadata import MetadataStore
from batchpush.policy import V2Metadata

HERE = os.path.dirname(os.path.abspath(__file__))
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _nobody_can_run(python: str, code: str = "pass", path: str = "") -> bool:
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*NOBODY, python, "-c", code], capture_output=True, timeout=60, env=environment, cwd="/").returncode == 0


class Nobody(NamedTuple):
    """How ``nobody`` runs batchpush: an interpreter it can run, and a module path it can read."""

    python: str
    path: str


def _readable_copy(source: str, into: str) -> str:
    """``source`` again under ``into`` (hard links where the file system allows, else
    copies): a clone in ``mktemp -d``'s directory (mode 0700) is root's alone."""
    target = os.path.join(into, os.path.basename(source))
    try:
        shutil.copytree(source, target, copy_function=os.link, symlinks=True)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def nobody_python() -> Iterator[Nobody]:
    """An interpreter ``nobody`` can run, of this one's version, and batchpush and the
    venv's packages where ``nobody`` can read them: where they are, or a copy."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = next((p for p in (os.path.realpath(sys.executable), f"/usr/bin/python{version}") if os.path.exists(p) and _nobody_can_run(p)), None)
    if python is None:
        pytest.fail(f"no Python {version} that nobody can run (the venv's is under a private home): install python{version}")
    path = os.pathsep.join([os.path.dirname(HERE), sysconfig.get_paths()["purelib"]])
    if _nobody_can_run(python, "import batchpush, isal", path):
        yield Nobody(python, path)
        return
    copies = tempfile.mkdtemp(prefix="batchpush-nobody-path-")
    try:
        os.chmod(copies, 0o755)  # noqa: S103 - nobody must read it
        package = _readable_copy(os.path.join(os.path.dirname(HERE), "batchpush"), os.path.join(copies, "source"))
        packages = _readable_copy(sysconfig.get_paths()["purelib"], copies)
        for root, dirs, _ in os.walk(copies):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)  # noqa: S103 - nobody must read it
        yield Nobody(python, os.pathsep.join([os.path.dirname(package), packages]))
    finally:
        shutil.rmtree(copies, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory ``nobody`` can read (pytest's tmp_path is root's own, mode 0700)."""
    path = tempfile.mkdtemp(prefix="batchpush-nobody-")
    os.chmod(path, 0o755)  # noqa: S103 - nobody must read it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(nobody: Nobody, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": nobody.path, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([*NOBODY, nobody.python, "-m", "batchpush", *args], capture_output=True, text=True, env=environment, timeout=110, cwd="/")


def readable_layout(shared_dir: str, seeds: list[int]) -> str:
    layout = os.path.join(shared_dir, "layout")
    simple_layout(layout, {"1.0": seeds})
    for root, dirs, files in os.walk(shared_dir):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)  # noqa: S103 - nobody must read it
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return layout


@pytest.mark.parametrize("cache", ["home /nonexistent", "XDG_CACHE_HOME not writable"])
def test_default_store_not_writable_warns_once_and_keeps_it_in_memory(registry, tmp_path, nobody_python, shared_dir, cache):
    layout = readable_layout(shared_dir, [31, 32])
    env = {}
    if cache != "home /nonexistent":
        unwritable = os.path.join(shared_dir, "cache")  # root's, 0755: nobody may read it, not write it
        os.mkdir(unwritable, 0o755)
        env["XDG_CACHE_HOME"] = unwritable
    args = ("push", f"oci:{layout}", f"{registry.host}/svc/app", "--insecure", registry.host)
    done = as_nobody(nobody_python, *args, env=env)
    assert done.returncode == 0, done.stderr
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("WARNING batchpush.metadata: the metadata store cannot be written in ")
    assert "kept in memory for this run" in warning and "next run" in warning
    assert "summary: 1 images: 1 pushed" in done.stdout
    pulled = pull_and_verify(registry, "svc/app:1.0", str(tmp_path / "pulled"))
    assert len(pulled[0].diff_ids) == 2
    again = as_nobody(nobody_python, *args, env=env)  # the next run knows nothing of this one, and is still right
    assert again.returncode == 0, again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert pull_and_verify(registry, "svc/app:1.0", str(tmp_path / "pulled-again"))[0].manifest_digest == pulled[0].manifest_digest


def test_the_warning_is_json_with_json_logs(registry, nobody_python, shared_dir):
    import json

    layout = readable_layout(shared_dir, [33])
    done = as_nobody(nobody_python, "push", f"oci:{layout}", f"{registry.host}/svc/json", "--insecure", registry.host, "--log-format", "json")
    assert done.returncode == 0, done.stderr
    (warning,) = [line for line in map(json.loads, done.stderr.splitlines()) if line["level"] == "warning"]
    assert warning["logger"] == "batchpush.metadata" and "kept in memory" in warning["message"]


@pytest.mark.parametrize("where", ["a directory of root's", "a store file of root's"])
def test_explicit_metadata_dir_not_writable_is_a_usage_error_before_any_request(registry, nobody_python, shared_dir, where):
    layout = readable_layout(shared_dir, [34])
    metadata = os.path.join(shared_dir, "md")
    os.mkdir(metadata, 0o755)
    if where == "a store file of root's":  # nobody owns the directory, root the database: SQLite opens it read-only
        MetadataStore(metadata).close()
        os.chmod(os.path.join(metadata, "metadata.db"), 0o644)
        os.chown(metadata, 65534, 65534)
    before = len(registry.access_log())
    done = as_nobody(nobody_python, "push", f"oci:{layout}", f"{registry.host}/svc/explicit", "--insecure", registry.host, "--metadata-dir", metadata)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: --metadata-dir {metadata}: cannot write the metadata store there: ")
    assert done.stdout == ""
    assert len(registry.access_log()) == before  # refused before any request


def test_in_memory_store_shared_by_threads():
    """The in-memory store's threads share one connection: transactions one at a time."""
    store = MetadataStore(in_memory=True)
    diff_ids = [Digest.sha256_of(b"%d" % n) for n in range(16)]

    def add(n: int) -> None:
        for k in range(20):
            store.add(diff_ids[n], V2Metadata(Digest.sha256_of(b"%d-%d" % (n, k)), f"repo{n}", "", "gzip"))

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(16)))
    assert all(len(store.get_metadata(diff_id)) == 20 for diff_id in diff_ids)
    store.close()
