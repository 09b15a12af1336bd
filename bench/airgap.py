"""Air-gapped export (issue 23): a namespace of a real registry to one OCI layout
(``batchpush push docker://HOST/team0/ oci:DIR``) against ``skopeo sync --dest dir``
over the same repositories, wall time and disk used by each; then the import of the
layout into a second registry (``batchpush push oci:DIR HOST2/imported/``).

The source holds REPOSITORIES repositories of TAGS tags each; every image is a base
layer shared by all (BASE_MB), a middle layer shared by its repository (MIDDLE_MB)
and an own layer (APP_MB), gzip as skopeo pushed them. skopeo writes one directory
per image, so it stores the shared layers again; the layout stores each blob once.

    .venv/bin/python bench/airgap.py [--repositories 8] [--tags 3] [--base-mb 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from fleet import synthetic_tar  # noqa: E402
from images import LayoutWriter  # noqa: E402
from registry import start_registry  # noqa: E402

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
BATCHPUSH = [sys.executable, "-m", "batchpush"]


def disk_bytes(path: str) -> int:
    """Bytes of the files below ``path`` (each inode once: hard links count once)."""
    seen: set[int] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


def fill(host: str, work: str, repositories: int, tags: int, base_mb: int, middle_mb: int, app_mb: int) -> list[str]:
    base = synthetic_tar(1, base_mb << 20)
    names = []
    for r in range(repositories):
        middle = synthetic_tar(100 + r, middle_mb << 20)
        for t in range(tags):
            layout = os.path.join(work, f"fill-{r}-{t}")
            writer = LayoutWriter(layout)
            descriptor, _ = writer.image([base, middle, synthetic_tar(1000 + r * 100 + t, app_mb << 20)])
            writer.tag(descriptor, "x")
            subprocess.run([SKOPEO, "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:x", f"docker://{host}/team0/svc{r}:v{t}"], check=True, capture_output=True)
            shutil.rmtree(layout)
        names.append(f"team0/svc{r}")
    return names


#: CPU seconds (user + system) of each command timed, by its first word after python
CPU_S: dict[str, float] = {}


def timed(command: list[str], name: str) -> float:
    """Wall seconds of ``command``; its CPU seconds go into CPU_S[name] (under load,
    the steadier figure of the two)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}... failed: {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S[name] = round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repositories", type=int, default=8)
    parser.add_argument("--tags", type=int, default=3)
    parser.add_argument("--base-mb", type=int, default=40)
    parser.add_argument("--middle-mb", type=int, default=8)
    parser.add_argument("--app-mb", type=int, default=2)
    parser.add_argument("--source-data", metavar="DIR", help="the source registry's storage, kept: filled once, reused by later runs of the same sizes")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-airgap-")
    extra = {"storage": {"filesystem": {"rootdirectory": args.source_data}}} if args.source_data else None
    filled = bool(args.source_data and os.path.isdir(os.path.join(args.source_data, "docker")))
    source = start_registry(os.path.join(work, "source"), extra)
    target = start_registry(os.path.join(work, "target"))
    try:
        if filled:
            repositories = [f"team0/svc{r}" for r in range(args.repositories)]
        else:
            repositories = fill(source.host, work, args.repositories, args.tags, args.base_mb, args.middle_mb, args.app_mb)
        layout, synced = os.path.join(work, "layout"), os.path.join(work, "skopeo-dir")
        export_s = timed([*BATCHPUSH, "push", f"docker://{source.host}/team0/", f"oci:{layout}", "--insecure", source.host, "--metadata-dir", os.path.join(work, "md"), "-q"], "export")
        sync_yaml = os.path.join(work, "sync.yaml")
        with open(sync_yaml, "w") as out:
            json.dump({source.host: {"images": {name: [] for name in repositories}, "tls-verify": False}}, out)
        sync_s = timed([SKOPEO, "--insecure-policy", "sync", "--src", "yaml", "--dest", "dir", "--preserve-digests", sync_yaml, synced], "skopeo_sync")
        again_s = timed([*BATCHPUSH, "push", f"docker://{source.host}/team0/", f"oci:{layout}", "--insecure", source.host, "--metadata-dir", os.path.join(work, "md"), "-q"], "re_export")
        import_s = timed([*BATCHPUSH, "push", f"oci:{layout}", f"{target.host}/imported/", "--insecure", target.host, "--metadata-dir", os.path.join(work, "md2"), "-q"], "import")
        result = {
            "images": args.repositories * args.tags,
            "load_average": os.getloadavg()[0],
            "batchpush_export_s": round(export_s, 2),
            "skopeo_sync_dir_s": round(sync_s, 2),
            "export_over_sync": round(export_s / sync_s, 3),
            "layout_bytes": disk_bytes(layout),
            "skopeo_dir_bytes": disk_bytes(synced),
            "re_export_s": round(again_s, 2),
            "import_s": round(import_s, 2),
            "cpu_s": CPU_S,
        }
        print(json.dumps(result, indent=2))
    finally:
        source.stop()
        target.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
