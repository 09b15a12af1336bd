"""Mirroring: ``docker://`` sources copied registry to registry, both real registries.

The source registry is filled by skopeo (an independent client) from OCI layouts
our test code writes; what arrives is read back by skopeo and compared, digest for
digest, with the source.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml
from conftest import pull_and_verify, remote_digest, skopeo
from fault_proxy import Rule
from images import LayoutWriter, layer_tar, random_layer
from referrers_api import ReferrersApi
from registry import Registry, start_registry

BLOB_COMMIT = re.compile(r'"PUT /v2/(\S+)/blobs/uploads/\S*digest=sha256%3A([0-9a-f]{64})\S* HTTP/1.1" 201')


@pytest.fixture
def source(tmp_path):
    started = start_registry(str(tmp_path / "source"))
    yield started
    started.stop()


def fill(registry: Registry, layout: str, tag: str, repository: str) -> None:
    """skopeo copies one tag of a layout into the registry, multi-arch whole."""
    done = skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}")
    assert done.returncode == 0, done.stderr


def app_layout(path: str, tags: dict[str, list[int]]) -> str:
    writer = LayoutWriter(path)
    for tag, seeds in tags.items():
        descriptor, _ = writer.image([layer_tar(s, file_size=20_000) for s in seeds])
        writer.tag(descriptor, tag)
    return path


def commits(registry: Registry) -> Counter[tuple[str, str]]:
    """(repository, digest) of every blob upload the registry committed."""
    return Counter(m.groups() for line in registry.access_log() if (m := BLOB_COMMIT.search(line)))


def requests_since(registry: Registry, mark: int) -> list[str]:
    return [line.split('"')[1] for line in registry.access_log()[mark:]]


def report_of(path) -> dict:  # type: ignore[no-untyped-def]
    with open(path) as f:
        return json.load(f)


def test_one_tag_is_copied_byte_for_byte(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2, 3]})
    fill(source, layout, "1.0", "team/app")
    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{source.host}/team/app:1.0", f"{registry.host}/mirror/app:1.0", "--insecure", source.host, "--insecure", registry.host, "--report", str(report))
    assert run.code == 0, run.err
    expected = remote_digest(source, "team/app:1.0")
    assert remote_digest(registry, "mirror/app:1.0") == expected
    image = report_of(report)["images"][0]
    assert (image["source"], image["digest"], image["source_digest"]) == (f"docker://{source.host}/team/app:1.0", expected, expected)
    pull_and_verify(registry, "mirror/app:1.0", str(tmp_path / "pulled"))


def test_every_tag_of_a_repository_and_a_tag_filter(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {f"v{i}": [1, 10 + i] for i in range(4)} | {"latest": [1, 20]})
    for tag in ("v0", "v1", "v2", "v3", "latest"):
        fill(source, layout, tag, "team/app")
    run = batchpush("push", f"docker://{source.host}/team/app", f"{registry.host}/all/app", "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    for tag in ("v0", "v1", "v2", "v3", "latest"):
        assert remote_digest(registry, f"all/app:{tag}") == remote_digest(source, f"team/app:{tag}")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [{"source": f"docker://{source.host}/team/app", "targets": [f"{registry.host}/some/app"], "tags": "^v[12]$"}],
    }))
    run = batchpush("run", str(plan), "--metadata-dir", str(tmp_path / "md2"))
    assert run.code == 0, run.err
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/some/app").stdout)["Tags"]
    assert sorted(listed) == ["v1", "v2"]


def multi_arch(path: str) -> str:
    writer = LayoutWriter(path)
    amd64, _ = writer.image([layer_tar(40), layer_tar(41)], arch="amd64")
    arm64, _ = writer.image([layer_tar(40), layer_tar(42)], arch="arm64")
    writer.tag(writer.index([amd64, arm64]), "multi")
    return path


def test_multi_arch_whole_and_a_platform_subset(source, registry, tmp_path, batchpush):
    fill(source, multi_arch(str(tmp_path / "multi")), "multi", "team/multi")
    run = batchpush("push", f"docker://{source.host}/team/multi:multi", f"{registry.host}/whole/multi:multi", "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    assert remote_digest(registry, "whole/multi:multi") == remote_digest(source, "team/multi:multi")
    assert len(pull_and_verify(registry, "whole/multi:multi", str(tmp_path / "whole"))) == 2

    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{source.host}/team/multi:multi", f"{registry.host}/arm/multi:multi", "--insecure", source.host, "--insecure", registry.host, "--platform", "linux/arm64", "--report", str(report))
    assert run.code == 0, run.err
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/arm/multi:multi").stdout)
    assert [m["platform"]["architecture"] for m in raw["manifests"]] == ["arm64"]
    source_index = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{source.host}/team/multi:multi").stdout)
    assert raw["manifests"][0] == source_index["manifests"][1]  # the child is the source's, untouched
    image = report_of(report)["images"][0]
    assert image["source_digest"] == remote_digest(source, "team/multi:multi") != image["digest"] == remote_digest(registry, "arm/multi:multi")
    assert len(pull_and_verify(registry, "arm/multi:multi", str(tmp_path / "arm"))) == 1


def test_same_registry_mounts_everything(registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2]})
    fill(registry, layout, "1.0", "team/app")
    before = commits(registry)
    run = batchpush("push", f"docker://{registry.host}/team/app:1.0", f"{registry.host}/copy/app:1.0", "--insecure", registry.host)
    assert run.code == 0, run.err
    assert commits(registry) == before  # no blob sent: all mounted from the source repository
    assert sum(1 for line in registry.access_log() if '"POST /v2/copy/app/blobs/uploads/?mount=' in line and '" 201 ' in line) == 3
    assert remote_digest(registry, "copy/app:1.0") == remote_digest(registry, "team/app:1.0")


def test_each_blob_crosses_once_per_target_registry(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"a": [1, 2, 3], "b": [1, 2, 4]})
    for tag in ("a", "b"):
        fill(source, layout, tag, "team/app")
    targets = [f"{registry.host}/one/app", f"{registry.host}/two/app"]
    run = batchpush("push", f"docker://{source.host}/team/app", *targets, "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    by_digest = Counter(digest for (_, digest) in commits(registry).elements())
    assert by_digest and max(by_digest.values()) == 1, by_digest
    for repo in ("one/app", "two/app"):
        for tag in ("a", "b"):
            assert remote_digest(registry, f"{repo}:{tag}") == remote_digest(source, f"team/app:{tag}")


def test_a_cron_rerun_reads_no_manifest_and_no_blob(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"v1": [1, 2], "v2": [1, 3]})
    for tag in ("v1", "v2"):
        fill(source, layout, tag, "team/app")
    args = ("push", f"docker://{source.host}/team/app", f"{registry.host}/cron/app", "--insecure", source.host, "--insecure", registry.host)
    assert batchpush(*args).code == 0
    source_mark, target_mark = len(source.access_log()), len(registry.access_log())
    report = tmp_path / "report.json"
    run = batchpush(*args, "--report", str(report))
    assert run.code == 0, run.err
    assert [i["status"] for i in report_of(report)["images"]] == ["up-to-date", "up-to-date"]
    at_source = [r for r in requests_since(source, source_mark) if not r.startswith("GET /v2/ ")]
    at_target = [r for r in requests_since(registry, target_mark) if not r.startswith("GET /v2/ ")]
    # the tag list, a manifest HEAD per image, and the run's one referrers request
    # (this registry answers 404: it does not serve the API, and is not asked again)
    assert sorted(r.split(" ")[0] for r in at_source) == ["GET", "GET", "HEAD", "HEAD"]
    assert sorted(r.split(" ")[1].split("?")[0].rsplit("/", 2)[1] for r in at_source if r.startswith("GET")) == ["referrers", "tags"]
    assert sorted(r.split(" ")[0] for r in at_target) == ["HEAD", "HEAD"]
    assert not [r for r in at_source + at_target if "/blobs/" in r]


def test_dry_run_reads_only(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2]})
    fill(source, layout, "1.0", "team/app")
    mark = len(registry.access_log())
    run = batchpush("push", f"docker://{source.host}/team/app:1.0", f"{registry.host}/dry/app:1.0", "--insecure", source.host, "--insecure", registry.host, "--dry-run")
    assert run.code == 0, run.err
    assert "upload" in run.out
    assert not [r for r in requests_since(registry, mark) if r.split(" ")[0] not in ("GET", "HEAD")]


def test_a_large_blob_streams_through(source, registry, tmp_path, batchpush):
    """A blob larger than a chunk streams from the source to the target (never
    spooled): it arrives whole and skopeo reads it back."""
    writer = LayoutWriter(str(tmp_path / "big"))
    descriptor, _ = writer.image([random_layer(7, 12 << 20)])
    writer.tag(descriptor, "big")
    fill(source, str(tmp_path / "big"), "big", "team/big")
    run = batchpush("push", f"docker://{source.host}/team/big:big", f"{registry.host}/big/app:big", "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    assert remote_digest(registry, "big/app:big") == remote_digest(source, "team/big:big")
    pull_and_verify(registry, "big/app:big", str(tmp_path / "pulled"))


def test_a_tag_that_is_missing_at_the_source_fails_that_image_only(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1]})
    fill(source, layout, "1.0", "team/app")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [
            {"source": f"docker://{source.host}/team/app:nope", "targets": [f"{registry.host}/miss/app:nope"]},
            {"source": f"docker://{source.host}/team/app:1.0", "targets": [f"{registry.host}/miss/app:1.0"]},
        ],
    }))
    run = batchpush("run", str(plan), "--metadata-dir", str(tmp_path / "md"))
    assert run.code == 1
    assert f"docker://{source.host}/team/app:nope" in run.err
    assert remote_digest(registry, "miss/app:1.0") == remote_digest(source, "team/app:1.0")


def upload_blob(client, repository: str, data: bytes, tmp_path) -> dict:  # type: ignore[no-untyped-def]
    """``data`` as a blob of ``repository``, with our own client; its digest and size."""
    from batchpush.digest import Digest
    from batchpush.registry.client import BlobUpload
    from batchpush.sources.base import FileRange

    digest = Digest.sha256_of(data)
    path = tmp_path / f"blob-{digest.hex}"
    path.write_bytes(data)
    client.upload_blob(repository, BlobUpload(client.start_upload(repository)), FileRange(str(path), 0, len(data)), digest)
    return {"digest": str(digest), "size": len(data)}


def attach_signature(registry: Registry, repository: str, subject: str, tmp_path) -> tuple[str, str]:
    """A cosign-style signature of ``subject`` (``sha256-<hex>.sig``: an OCI manifest
    whose layer is a simple-signing payload) and the OCI 1.1 referrers fallback tag
    (``sha256-<hex>``: an index naming it), written with our own client."""
    import hashlib

    from batchpush.registry.client import RegistryClient, RegistryOptions

    client = RegistryClient(registry.host, RegistryOptions(insecure=True))
    try:
        payload = json.dumps({"critical": {"image": {"docker-manifest-digest": subject}, "type": "cosign container image signature"}}).encode()
        config = {"mediaType": "application/vnd.oci.image.config.v1+json", **upload_blob(client, repository, b"{}", tmp_path)}
        layer = {"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", **upload_blob(client, repository, payload, tmp_path), "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ-test"}}
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": [layer]}).encode()
        hex_ = subject.split(":")[1]
        sig_tag = f"sha256-{hex_}.sig"
        client.put_manifest(repository, sig_tag, "application/vnd.oci.image.manifest.v1+json", manifest)
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(), "size": len(manifest), "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"},
        ]}).encode()
        client.put_manifest(repository, f"sha256-{hex_}", "application/vnd.oci.image.index.v1+json", index)
        return sig_tag, f"sha256-{hex_}"
    finally:
        client.close()


def test_signatures_go_with_their_image(source, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2], "2.0": [1, 3]})
    for tag in ("1.0", "2.0"):
        fill(source, layout, tag, "team/app")
    signed = remote_digest(source, "team/app:1.0")
    sig_tag, referrers_tag = attach_signature(source, "team/app", signed, tmp_path)
    report = tmp_path / "report.json"
    run = batchpush("push", f"docker://{source.host}/team/app", f"{registry.host}/signed/app", "--insecure", source.host, "--insecure", registry.host, "--report", str(report))
    assert run.code == 0, run.err
    for tag in (sig_tag, referrers_tag):  # byte for byte
        assert remote_digest(registry, f"signed/app:{tag}") == remote_digest(source, f"team/app:{tag}")
    images = {i["target"].rsplit(":", 1)[1]: i for i in report_of(report)["images"]}
    assert set(images) == {"1.0", "2.0"}  # attachments are not images of their own
    assert sorted(images["1.0"]["attachments"]) == sorted([sig_tag, referrers_tag]) and images["2.0"]["attachments"] == []

    # one tag named: its signatures still come with it; --no-signatures: they do not
    run = batchpush("push", f"docker://{source.host}/team/app:1.0", f"{registry.host}/one/app:1.0", "--insecure", source.host, "--insecure", registry.host)
    assert run.code == 0, run.err
    assert remote_digest(registry, f"one/app:{sig_tag}") == remote_digest(source, f"team/app:{sig_tag}")
    run = batchpush("push", f"docker://{source.host}/team/app:1.0", f"{registry.host}/bare/app:1.0", "--insecure", source.host, "--insecure", registry.host, "--no-signatures")
    assert run.code == 0, run.err
    listed = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/bare/app").stdout)["Tags"]
    assert listed == ["1.0"]


def push_referrer(registry: Registry, api: ReferrersApi, repository: str, subject: str, artifact_type: str, payload: bytes, tmp_path) -> str:
    """An OCI 1.1 artifact naming ``subject`` (``docker://`` reference, as skopeo
    gives it) as its subject, pushed by digest, untagged, through ``api``: its blobs
    straight to the registry, its manifest through the API's proxy (which indexes
    it). Its digest."""
    from batchpush.digest import Digest
    from batchpush.registry.client import RegistryClient, RegistryOptions

    inspected = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repository}@{subject}").stdout.encode()
    direct = RegistryClient(registry.host, RegistryOptions(insecure=True))
    through_api = RegistryClient(api.host, RegistryOptions(insecure=True))
    try:
        config = {"mediaType": "application/vnd.oci.empty.v1+json", **upload_blob(direct, repository, b"{}", tmp_path)}
        layer = {"mediaType": artifact_type, **upload_blob(direct, repository, payload, tmp_path)}
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": artifact_type,
            "config": config, "layers": [layer],
            "subject": {"mediaType": json.loads(inspected)["mediaType"], "digest": subject, "size": len(inspected)},
        }).encode()
        digest = str(Digest.sha256_of(manifest))
        through_api.put_manifest(repository, digest, "application/vnd.oci.image.manifest.v1+json", manifest)
        return digest
    finally:
        direct.close()
        through_api.close()


@pytest.fixture
def source_api(source):
    api = ReferrersApi(source.host)
    yield api
    api.stop()


def test_referrers_the_source_lists_go_with_their_image(source, source_api, registry, tmp_path, batchpush):
    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2]})
    fill(source, layout, "1.0", "team/app")
    subject = remote_digest(source, "team/app:1.0")
    sbom = push_referrer(source, source_api, "team/app", subject, "application/spdx+json", b'{"spdxVersion": "SPDX-2.3"}', tmp_path)
    signature = push_referrer(source, source_api, "team/app", subject, "application/vnd.dev.sigstore.bundle.v0.3+json", b'{"signature": "test"}', tmp_path)
    fallback = f"sha256-{subject.split(':')[1]}"
    report = tmp_path / "report.json"
    args = ("--insecure", source_api.host, "--insecure", registry.host, "--report", str(report))

    # a target without the API: the referrers by digest, byte for byte, and the fallback tag naming them
    run = batchpush("push", f"docker://{source_api.host}/team/app:1.0", f"{registry.host}/ref/app:1.0", *args)
    assert run.code == 0, run.err
    assert sorted(report_of(report)["images"][0]["attachments"]) == sorted([sbom, signature, fallback])
    for referrer in (sbom, signature):
        assert remote_digest(registry, f"ref/app@{referrer}") == referrer
    listed = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/ref/app:{fallback}").stdout)
    assert {m["digest"] for m in listed["manifests"]} == {sbom, signature}
    assert {m["artifactType"] for m in listed["manifests"]} == {"application/spdx+json", "application/vnd.dev.sigstore.bundle.v0.3+json"}
    pull_and_verify(registry, "ref/app:1.0", str(tmp_path / "pulled"))

    # again: nothing written (the referrers are there, the tag names them all)
    mark = len(registry.access_log())
    run = batchpush("push", f"docker://{source_api.host}/team/app:1.0", f"{registry.host}/ref/app:1.0", *args)
    assert run.code == 0, run.err
    assert report_of(report)["images"][0]["status"] == "up-to-date"
    assert not [r for r in requests_since(registry, mark) if r.split(" ")[0] not in ("GET", "HEAD")]

    # a target that serves the API indexes them itself: no fallback tag is written
    target_api = ReferrersApi(registry.host)
    try:
        run = batchpush("push", f"docker://{source_api.host}/team/app:1.0", f"{target_api.host}/api/app:1.0", *args, "--insecure", target_api.host)
        assert run.code == 0, run.err
        assert sorted(report_of(report)["images"][0]["attachments"]) == sorted([sbom, signature])
        assert json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/api/app").stdout)["Tags"] == ["1.0"]
        assert {d for _, d in target_api.asked} == {subject}
    finally:
        target_api.stop()

    # --no-signatures: the API is not even asked
    asked = len(source_api.asked)
    run = batchpush("push", f"docker://{source_api.host}/team/app:1.0", f"{registry.host}/bare/app:1.0", *args, "--no-signatures")
    assert run.code == 0, run.err
    assert len(source_api.asked) == asked
    assert json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/bare/app").stdout)["Tags"] == ["1.0"]


def test_a_referrers_route_the_source_does_not_know_and_a_referrer_that_fails(source, source_api, registry, tmp_path, batchpush):
    """A 405 where the API would be says the API is not served (the image goes, the
    fallback tag would carry its referrers); a listed referrer that cannot be
    copied fails its image, told once, as the image's failure."""
    from fault_proxy import FaultProxy, Rule

    layout = app_layout(str(tmp_path / "app"), {"1.0": [1, 2]})
    fill(source, layout, "1.0", "team/app")
    front = FaultProxy(source.host)
    try:
        front.add(Rule("GET", "/referrers/", "status", status=405, times=-1))
        report = tmp_path / "report.json"
        run = batchpush("push", f"docker://{front.host}/team/app:1.0", f"{registry.host}/r405/app:1.0", "--insecure", front.host, "--insecure", registry.host, "--report", str(report))
        assert run.code == 0, run.err
        assert [i["status"] for i in report_of(report)["images"]] == ["pushed"]
        assert len(front.requests("GET", "/referrers/")) == 1
    finally:
        front.stop()

    subject = remote_digest(source, "team/app:1.0")
    # its layer is the same blob as its config (the empty ``{}``), under another media type
    empty = push_referrer(source, source_api, "team/app", subject, "application/spdx+json", b"{}", tmp_path)
    # a referrer the API lists but the registry does not hold
    source_api._index[("team/app", subject)]["sha256:" + "ab" * 32] = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "ab" * 32, "size": 2}
    run = batchpush("push", f"docker://{source_api.host}/team/app:1.0", f"{registry.host}/rbad/app:1.0", "--insecure", source_api.host, "--insecure", registry.host, "--report", str(report))
    assert run.code == 1
    (image,) = report_of(report)["images"]
    assert image["status"] == "failed" and "ab" * 32 in image["error"], image["error"]
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {registry.host}/rbad/app:1.0: referrers of {subject}"), run.err
    assert remote_digest(registry, f"rbad/app@{empty}") == empty  # listed first, copied byte for byte


def test_prune_drops_what_the_source_no_longer_has(source, registry, tmp_path, batchpush):
    """Plan ``prune: true``: once every image arrived, target tags the source lost are
    deleted (by digest; one that a kept tag also names stays); --dry-run only lists
    them; a tag outside the entry's filter is never touched."""
    layout = app_layout(str(tmp_path / "app"), {"v1": [1, 2], "v2": [1, 3], "v3": [1, 4]})
    for tag in ("v1", "v2", "v3"):
        fill(source, layout, tag, "team/app")
    fill(registry, layout, "v1", "mirror/app")  # the target also holds ...
    done = skopeo("copy", "--dest-tls-verify=false", "--src-tls-verify=false", f"docker://{registry.host}/mirror/app:v1", f"docker://{registry.host}/mirror/app:old-v1")
    assert done.returncode == 0, done.stderr  # ... a stale tag naming a kept manifest
    fill(registry, app_layout(str(tmp_path / "gone"), {"v0": [9]}), "v0", "mirror/app")  # ... a tag the source lost
    fill(registry, app_layout(str(tmp_path / "other"), {"keep": [8]}), "keep", "mirror/app")  # ... a tag outside the filter
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1,
        "defaults": {"insecure": True},
        "images": [{"source": f"docker://{source.host}/team/app", "targets": [f"{registry.host}/mirror/app"], "tags": "^(v[0-9]+|old-v1)$", "prune": True}],
    }))

    def target_tags() -> list[str]:
        return sorted(json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{registry.host}/mirror/app").stdout)["Tags"])

    run = batchpush("run", str(plan), "--metadata-dir", str(tmp_path / "md"), "--dry-run")
    assert run.code == 0, run.err
    assert f"{registry.host}/mirror/app:v0: would delete" in run.out
    assert target_tags() == ["keep", "old-v1", "v0", "v1"]  # the dry run deleted nothing (nor pushed)

    report = tmp_path / "report.json"
    run = batchpush("run", str(plan), "--metadata-dir", str(tmp_path / "md"), "--report", str(report))
    assert run.code == 0, run.err
    assert target_tags() == ["keep", "old-v1", "v1", "v2", "v3"]
    pruned = {p["target"].rsplit(":", 1)[1]: p for p in report_of(report)["pruned"]}
    assert pruned["v0"]["deleted"] is True
    assert pruned["old-v1"]["deleted"] is False and "names the same manifest" in pruned["old-v1"]["reason"]


def test_prune_needs_a_whole_repository(tmp_path):
    from batchpush.errors import PlanError
    from batchpush.plan import validate_plan

    for source, target in (("docker://r.example/team/app:1", "t.example/m/app"), ("oci:./x", "t.example/m/app"), ("docker://r.example/team/app", "t.example/m/app:1")):
        with pytest.raises(PlanError, match="prune"):
            validate_plan("plan.yaml", {"version": 1, "images": [{"source": source, "targets": [target], "prune": True}]})


def test_a_spent_pull_budget_stops_asking_the_source(source, registry, tmp_path, batchpush):
    """Docker Hub's RateLimit-Remaining reaching 0: the images still to copy fail at
    once with one clear line, and the source gets no more manifest GETs (pulls)."""
    from fault_proxy import FaultProxy, Rule

    layout = app_layout(str(tmp_path / "app"), {"a": [1], "b": [2], "c": [3]})
    for tag in ("a", "b", "c"):
        fill(source, layout, tag, "team/app")
    proxy = FaultProxy(source.host)
    try:
        # the first pull (a manifest GET) spends the budget; HEADs state nothing here
        proxy.add(Rule("GET", "/manifests/", "headers", headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "0;w=21600"}, times=-1))
        report = tmp_path / "report.json"
        run = batchpush("push", f"docker://{proxy.host}/team/app", f"{registry.host}/budget/app", "--insecure", proxy.host, "--insecure", registry.host, "--max-concurrent-images", "1", "--report", str(report))
        assert run.code == 1
        statuses = [i["status"] for i in report_of(report)["images"]]
        assert statuses.count("pushed") == 1 and statuses.count("failed") == 2
        assert run.err.count("pull budget is spent (RateLimit-Remaining 0 of 100 per 21600 s)") == 2
        assert len(proxy.requests("GET", "/manifests/")) == 1
    finally:
        proxy.stop()


def test_a_source_hosts_max_concurrent_uploads_bounds_its_reads(source, front, registry, tmp_path, metadata_dir):
    """Per-host settings apply to a host whether it is read or written: a source with
    max_concurrent_uploads 1 serves one blob read at a time, however many the
    target takes at once. Counted at the proxy in front of the source: its first blob
    answer is held until a second read is in flight (or 2 s pass), so reads that
    overlap are seen, and the most in flight at once must be 1."""
    from batchpush.engine import Engine, PushJob, PushOptions
    from batchpush.registry.client import RegistryOptions

    writer = LayoutWriter(str(tmp_path / "many"))
    for i in range(4):
        descriptor, _ = writer.image([random_layer(60 + i, 2 << 20), random_layer(70 + i, 2 << 20)])
        writer.tag(descriptor, f"t{i}")
    for i in range(4):
        fill(source, str(tmp_path / "many"), f"t{i}", "team/many")
    reads = front.add(Rule("GET", "/blobs/sha256:", "forward", times=-1, hold_until_in_flight=2, hold_s=2))
    registries = {front.host: RegistryOptions(insecure=True, max_concurrent_uploads=1), registry.host: RegistryOptions(insecure=True, max_concurrent_uploads=4)}
    with Engine(PushOptions(registries=registries, metadata_dir=metadata_dir)) as engine:
        result = engine.run([PushJob(f"docker://{front.host}/team/many", (f"{registry.host}/bounded/many",))])
        assert result.ok, [i.error for i in result.images]
        assert engine._clients[registry.host].max_concurrent_reads == 0  # the target is not read
    assert reads.fired >= 8 and reads.peak_in_flight == 1  # every layer read, one at a time
    for i in range(4):
        assert remote_digest(registry, f"bounded/many:t{i}") == remote_digest(source, f"team/many:t{i}")
