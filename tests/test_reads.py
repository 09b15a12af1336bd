"""The registry client's read side (a mirror's source) and the upload of a stream,
against the real registry, faults injected by our proxy in front of it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from conftest import pull_and_verify
from fault_proxy import FaultProxy, Rule
from images import OCI_MANIFEST, LayoutWriter, random_layer
from registry import Registry, start_registry

from batchpush.digest import CHUNK_BYTES, Digest
from batchpush.errors import Cancelled, DigestMismatchError, ReferenceError_
from batchpush.registry.auth import Credentials
from batchpush.registry.client import BlobUpload, RegistryClient, RegistryOptions
from batchpush.registry.errors import MalformedResponseError, RegistryError, UploadGoneError
from batchpush.registry.reads import MAX_MANIFEST_BYTES, READ_BYTES, BlobReader, RateLimit, next_link, parse_link_header, parse_rate_limit_value, rate_limit_of, valid_tag
from batchpush.sources.base import FileRange, RegistryBlob

LAYER_BYTES = 3 << 20  # three reads' pieces and a bit
REPO = "mirror/src"


@dataclass
class Seeded:
    """An image pushed to the source registry: its manifest, config and layer."""

    manifest: bytes
    manifest_digest: Digest
    config: FileRange
    config_digest: Digest
    layer: FileRange
    layer_digest: Digest
    diff_ids: list[str]


def _client(host: str, **options) -> RegistryClient:  # type: ignore[no-untyped-def]
    return RegistryClient(host, RegistryOptions(insecure=True, **options))


@pytest.fixture
def clients() -> Iterator[list[RegistryClient]]:
    made: list[RegistryClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def make_client(clients):  # type: ignore[no-untyped-def]
    def make(host: str, **options) -> RegistryClient:  # type: ignore[no-untyped-def]
        clients.append(_client(host, **options))
        return clients[-1]

    return make


@pytest.fixture
def target(tmp_path) -> Iterator[Registry]:
    started = start_registry(str(tmp_path))
    yield started
    started.stop()


@pytest.fixture
def proxy(registry) -> Iterator[FaultProxy]:
    started = FaultProxy(registry.host)
    yield started
    started.stop()


@pytest.fixture
def target_proxy(target) -> Iterator[FaultProxy]:
    started = FaultProxy(target.host)
    yield started
    started.stop()


def _upload_file(client: RegistryClient, repository: str, blob: FileRange, digest: Digest) -> None:
    client.upload_blob(repository, BlobUpload(client.start_upload(repository)), blob, digest)


def seed(registry: Registry, layout: str, tags: tuple[str, ...] = ("1.0",), layer_bytes: int = LAYER_BYTES) -> Seeded:
    """One image in ``REPO`` of ``registry``, pushed by our client (a file's bytes as
    they are: no recompression), under each of ``tags``."""
    writer = LayoutWriter(layout)
    descriptor, image = writer.image([random_layer(7, layer_bytes)])
    manifest_path = os.path.join(layout, "blobs", "sha256", descriptor["digest"].split(":")[1])
    with open(manifest_path, "rb") as f:
        manifest = f.read()
    document = json.loads(manifest)

    def file_of(d: dict) -> tuple[FileRange, Digest]:
        return FileRange(os.path.join(layout, "blobs", "sha256", d["digest"].split(":")[1]), 0, d["size"]), Digest.parse(d["digest"])

    config, config_digest = file_of(document["config"])
    layer, layer_digest = file_of(document["layers"][0])
    client = _client(registry.host)
    try:
        _upload_file(client, REPO, config, config_digest)
        _upload_file(client, REPO, layer, layer_digest)
        for tag in tags:
            client.put_manifest(REPO, tag, OCI_MANIFEST, manifest)
    finally:
        client.close()
    return Seeded(manifest, Digest.parse(descriptor["digest"]), config, config_digest, layer, layer_digest, image.diff_ids)


def file_bytes(blob: FileRange) -> bytes:
    with blob.open() as f:
        return f.read()


def read_all(reader: BlobReader) -> tuple[bytes, list[int]]:
    """The stream's bytes and the lengths of its pieces."""
    out = bytearray()
    lengths = []
    for piece in reader.views():
        out += piece
        lengths.append(len(piece))
    return bytes(out), lengths


def remote_blob(host: str, seeded: Seeded, *, size: int | None = None, digest: Digest | None = None) -> RegistryBlob:
    return RegistryBlob(host, REPO, digest or seeded.layer_digest, seeded.layer.size if size is None else size)


# -- manifests -----------------------------------------------------------------


def test_get_manifest_by_tag_and_by_digest(registry, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    client = make_client(registry.host)
    by_tag = client.get_manifest(REPO, "1.0")
    assert (by_tag.raw, by_tag.media_type, by_tag.digest) == (seeded.manifest, OCI_MANIFEST, seeded.manifest_digest)
    assert client.get_manifest(REPO, str(seeded.manifest_digest)) == by_tag
    assert client.rate_limit is None and client.rate_limit_remaining is None  # distribution states no quota


@pytest.mark.parametrize("by", ["digest", "tag"])
def test_a_manifest_whose_bytes_are_not_its_digest_is_refused(registry, proxy, tmp_path, make_client, by):
    """By digest: our own check. By tag: distribution's Docker-Content-Digest is the check."""
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/manifests/", "corrupt_body", response_bytes=10))
    reference = str(seeded.manifest_digest) if by == "digest" else "1.0"
    with pytest.raises(DigestMismatchError) as caught:
        make_client(proxy.host).get_manifest(REPO, reference)
    assert caught.value.path == (f"docker://{proxy.host}/{REPO}@{reference}" if by == "digest" else f"docker://{proxy.host}/{REPO}:1.0")
    assert caught.value.expected == str(seeded.manifest_digest)
    assert type(caught.value) is DigestMismatchError


def test_the_registrys_stated_digest_must_match(registry, proxy, tmp_path, make_client):
    seed(registry, str(tmp_path / "layout"))
    other = "sha256:" + "0" * 64
    proxy.add(Rule("GET", "/manifests/1.0", "headers", headers={"Docker-Content-Digest": other}))
    with pytest.raises(DigestMismatchError) as caught:
        make_client(proxy.host).get_manifest(REPO, "1.0")
    assert caught.value.expected == other
    proxy.add(Rule("GET", "/manifests/1.0", "headers", headers={"Docker-Content-Digest": "sha256:not-hex"}))
    with pytest.raises(MalformedResponseError) as malformed:
        make_client(proxy.host).get_manifest(REPO, "1.0")
    assert malformed.value.temporary


@pytest.mark.parametrize("stated_length", [True, False])
def test_a_manifest_over_the_limit_is_refused(registry, proxy, make_client, stated_length):
    body = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"
    headers = {"Content-Type": OCI_MANIFEST} if stated_length else {"Content-Type": OCI_MANIFEST, "Connection": "close"}
    # without a Content-Length the body ends when the connection closes: only our limit stops the read
    proxy.add(Rule("GET", "/manifests/big", "status", status=200, headers=headers, body=body, raw_headers=not stated_length, close=not stated_length))
    with pytest.raises(RegistryError) as caught:
        make_client(proxy.host).get_manifest(REPO, "big")
    assert not caught.value.temporary
    assert f"{REPO}:big" in str(caught.value) and str(MAX_MANIFEST_BYTES) in str(caught.value)


@pytest.mark.parametrize("reference", ["../x", "a b", "-dash", "sha256:abc", "md5:" + "0" * 32, "t" * 129, "ünï"])
def test_a_reference_that_is_not_a_tag_or_a_digest_is_never_sent(make_client, reference):
    client = make_client("127.0.0.1:9")  # nothing listens: any request would fail otherwise
    with pytest.raises(ReferenceError_):
        client.get_manifest(REPO, reference)
    assert not client.requests_by_method


def test_rate_limit_headers_are_parsed_and_exposed(registry, proxy, tmp_path, make_client):
    seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/manifests/1.0", "headers", headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "76;w=21600"}))
    client = make_client(proxy.host)
    client.get_manifest(REPO, "1.0")
    assert client.rate_limit == RateLimit(remaining=76, limit=100, window_s=21600)
    assert client.rate_limit_remaining == 76
    client.get_manifest(REPO, "1.0")  # the next answer states none: what the last one said holds
    assert client.rate_limit_remaining == 76


def test_rate_limit_values():
    assert parse_rate_limit_value("76;w=21600") == (76, 21600)
    assert parse_rate_limit_value(" 0 ; w = 60 ") == (0, 60)
    assert parse_rate_limit_value("100") == (100, None)
    assert parse_rate_limit_value("100, 100;w=21600") == (100, None)  # the first policy of a list
    for bad in (None, "", "-1;w=60", "²", "many", "1e3", "9" * 19):
        assert parse_rate_limit_value(bad) is None, bad
    assert rate_limit_of({"RateLimit-Remaining": "5;w=60"}) == RateLimit(5, None, 60)
    assert rate_limit_of({"RateLimit-Limit": "200;w=21600"}) == RateLimit(None, 200, 21600)
    assert rate_limit_of({}) is None


# -- tag lists -------------------------------------------------------------------
TAGS = ["1.0", "1.1", "2.0", "latest", "v3"]


def seed_tags(registry: Registry, tmp_path) -> Seeded:  # type: ignore[no-untyped-def]
    return seed(registry, str(tmp_path / "layout"), tags=tuple(TAGS), layer_bytes=1000)


def tag_pages(proxy: FaultProxy) -> list[str]:
    return [seen.target for seen in proxy.requests("GET", "/tags/list")]


def link_to(page: str) -> dict[str, str]:
    return {"Link": f'<{page}>; rel="next"'}


def test_tags_are_listed_following_next_links(registry, proxy, tmp_path, make_client):
    """distribution 2.8 answers every page with the whole list (it ignores ``n`` on
    tags/list; pages arrived in v3): the proxy adds the Links a paging registry sends,
    relative as distribution writes them, and the registry answers each page."""
    seed_tags(registry, tmp_path)
    client = make_client(proxy.host)
    assert sorted(client.list_tags(REPO)) == TAGS  # the registry's order is its storage's
    assert tag_pages(proxy) == [f"/v2/{REPO}/tags/list?n=1000"]
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to(f"/v2/{REPO}/tags/list?last=1.1&n=2")))
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to("list?last=latest&n=2")))  # relative to the page's URL
    listed = client.list_tags(REPO, page_size=2)
    assert sorted(listed) == TAGS and len(listed) == len(TAGS)  # each tag once, however many pages name it
    assert tag_pages(proxy)[1:] == [f"/v2/{REPO}/tags/list?n=2", f"/v2/{REPO}/tags/list?last=1.1&n=2", f"/v2/{REPO}/tags/list?last=latest&n=2"]


def test_an_absolute_link_on_the_same_origin_is_followed(registry, proxy, tmp_path, make_client):
    seed_tags(registry, tmp_path)
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to(f"http://{proxy.host}/v2/{REPO}/tags/list?n=2&last=1.1")))
    assert sorted(make_client(proxy.host).list_tags(REPO, page_size=2)) == TAGS
    assert len(tag_pages(proxy)) == 2


@pytest.mark.parametrize("back_to", ["/v2/mirror/src/tags/list?n=2", "/v2/mirror/src/tags/list?last=1.1&n=2"])
def test_a_link_back_to_a_page_already_read_is_refused(registry, proxy, tmp_path, make_client, back_to):
    seed_tags(registry, tmp_path)
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to("/v2/mirror/src/tags/list?last=1.1&n=2")))
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to(back_to), times=-1))
    with pytest.raises(RegistryError) as caught:
        make_client(proxy.host).list_tags(REPO, page_size=2)
    assert not caught.value.temporary and "already read" in str(caught.value)
    assert len(tag_pages(proxy)) == 2


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ("http://198.51.100.7:5000/v2/mirror/src/tags/list?n=2&last=1.1", "another host"),
        ("https://{host}/v2/mirror/src/tags/list?n=2&last=1.1", "another host"),  # another scheme: another origin
        ("http://user@{host}/v2/mirror/src/tags/list?n=2&last=1.1", "another host"),
        ("//198.51.100.7/v2/mirror/src/tags/list?n=2&last=1.1", "another host"),
        ("/v2/mirror/other/tags/list?n=2&last=1.1", "another path"),
        ("../../other/tags/list?n=2", "another path"),
        ("/v2/mirror/src/manifests/1.0", "another path"),
        ("http://[::1/v2/mirror/src/tags/list", "not a URL"),
    ],
)
def test_a_link_elsewhere_is_refused_and_not_followed(registry, proxy, tmp_path, make_client, link, problem):
    seed_tags(registry, tmp_path)
    proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to(link.format(host=proxy.host))))
    with pytest.raises(RegistryError) as caught:
        make_client(proxy.host).list_tags(REPO, page_size=2)
    assert not caught.value.temporary and problem in str(caught.value)
    assert "last=" not in str(caught.value)  # the link's query is not quoted
    assert len(proxy.requests("GET")) == 2  # the ping and the first page: nothing followed


def test_too_many_pages_or_tags_are_refused(registry, proxy, tmp_path, make_client):
    seed_tags(registry, tmp_path)
    client = make_client(proxy.host)
    with pytest.raises(RegistryError) as tags:
        client.list_tags(REPO, max_tags=4)
    assert not tags.value.temporary and "4 tags" in str(tags.value)
    assert sorted(client.list_tags(REPO, max_pages=1, max_tags=5)) == TAGS  # the limits themselves pass
    for n in range(1, 5):  # a registry whose pages never end
        proxy.add(Rule("GET", "/tags/list", "headers", headers=link_to(f"/v2/{REPO}/tags/list?last=t{n}&n=1"), times=-1 if n == 4 else 1))
    with pytest.raises(RegistryError) as pages:
        client.list_tags(REPO, page_size=1, max_pages=3)
    assert not pages.value.temporary and "3 pages" in str(pages.value)
    assert len(tag_pages(proxy)) == 2 + 3


def test_names_that_are_not_tags_are_skipped_with_a_warning(registry, proxy, tmp_path, make_client, caplog):
    """The registry's own list, with names no registry would hold added by the proxy."""
    seed_tags(registry, tmp_path)
    names = ["good", "../../etc/passwd", "-dash", ".dot", "ünï", "a" * 129, "a" * 128, "x/y", "tab\tbed", 5, None, "good", "v1.0_x-Y"]

    def add_names(body: bytes) -> bytes:
        document = json.loads(body)
        assert sorted(document["tags"]) == TAGS  # the registry's answer, altered only here
        document["tags"] += names
        return json.dumps(document).encode()

    proxy.add(Rule("GET", "/tags/list", "forward", body_filter=add_names))
    with caplog.at_level(logging.WARNING, logger="batchpush.registry.client"):
        listed = make_client(proxy.host).list_tags(REPO)
    assert sorted(listed) == sorted([*TAGS, "good", "a" * 128, "v1.0_x-Y"]) and len(listed) == len(TAGS) + 3
    assert len(caplog.records) == 9 and "'../../etc/passwd'" in caplog.text


def empty_repository(registry: Registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``REPO`` with no tag left: an image pushed, then its manifest deleted
    (distribution then lists its tags as null)."""
    seeded = seed(registry, str(tmp_path / "layout"), layer_bytes=1000)
    assert requests.delete(f"{registry.url}/v2/{REPO}/manifests/{seeded.manifest_digest}", timeout=30).status_code == 202
    assert requests.get(f"{registry.url}/v2/{REPO}/tags/list", timeout=30).json() == {"name": REPO, "tags": None}


@pytest.mark.parametrize("body", [None, b"{}"], ids=["registry-null", "no-tags-key"])
def test_an_empty_tag_list(registry, proxy, tmp_path, make_client, body):
    """The real registry's empty repository (its answer as it is: tags null), and the
    same answer without a tags key at all (the proxy's only change)."""
    empty_repository(registry, tmp_path)
    if body is not None:
        proxy.add(Rule("GET", "/tags/list", "forward", body_filter=lambda _: body))
    assert make_client(proxy.host).list_tags(REPO) == []
    assert [seen.status for seen in proxy.requests("GET", "/tags/list")] == [200]


@pytest.mark.parametrize("body", [b"<html>", b'{"tags":"1.0"}', b"\xff\xfe"])
def test_a_tag_list_that_is_not_one_is_malformed(registry, proxy, tmp_path, make_client, body):
    """The registry answers its real list; the proxy replaces the body."""
    seed_tags(registry, tmp_path)
    proxy.add(Rule("GET", "/tags/list", "forward", body_filter=lambda _: body))
    with pytest.raises(MalformedResponseError):
        make_client(proxy.host).list_tags(REPO)
    assert [seen.status for seen in proxy.requests("GET", "/tags/list")] == [200]


def test_link_header_parsing():
    assert parse_link_header('</v2/a/tags/list?n=2&last=b>; rel="next"') == [("/v2/a/tags/list?n=2&last=b", frozenset({"next"}))]
    many = '<https://x/a,b>; title="a, <b>; c"; rel="prev start", </next?x=1>;rel=next, <junk'
    assert parse_link_header(many) == [("https://x/a,b", frozenset({"prev", "start"})), ("/next?x=1", frozenset({"next"}))]
    assert next_link(many) == "/next?x=1"
    assert next_link('</a>; rel="NEXT last"') == "/a"
    assert next_link('</a>; rel="nextpage", </b>; rel=prev') is None
    assert next_link('</a>; rel="prev"; rel="next"') is None  # only a link's first rel counts
    assert next_link("") is None and next_link(None) is None and next_link("garbage") is None


def test_tag_names():
    assert all(valid_tag(t) for t in ("a", "_", "1.0", "v1.0-rc_1", "A" * 128))
    assert not any(valid_tag(t) for t in ("", ".a", "-a", "a/b", "a:b", "A" * 129, "é", "a\n", 1, None))


# -- blob streams ------------------------------------------------------------------


def test_a_blob_streams_in_chunk_pieces(registry, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    client = make_client(registry.host)
    reader = client.blob_reader(remote_blob(registry.host, seeded))
    data, lengths = read_all(reader)
    assert data == file_bytes(seeded.layer)
    assert lengths[:-1] == [CHUNK_BYTES] * (len(lengths) - 1) and 0 < lengths[-1] <= CHUNK_BYTES
    assert reader.bytes_read == client.bytes_read == seeded.layer.size and reader.resumes == 0
    assert read_all(reader)[0] == data  # each views() is a new read
    assert reader.name == f"docker://{registry.host}/{REPO}@{seeded.layer_digest}"


def test_a_blob_reader_is_for_its_own_registry(make_client):
    blob = RegistryBlob("elsewhere:5000", REPO, Digest.sha256_of(b""), 0)
    with pytest.raises(ValueError, match="elsewhere"):
        make_client("127.0.0.1:9").blob_reader(blob)


def test_an_empty_blob(registry, make_client):
    client = make_client(registry.host)
    digest = Digest.sha256_of(b"")
    upload = BlobUpload(client.start_upload(REPO))
    client.upload_blob(REPO, upload, FileRange(os.devnull, 0, 0), digest)
    assert read_all(client.blob_reader(RegistryBlob(registry.host, REPO, digest, 0))) == (b"", [])


@pytest.mark.parametrize("delta", [1, -1])
def test_a_size_that_is_not_the_blobs_is_a_mismatch(registry, tmp_path, make_client, delta):
    seeded = seed(registry, str(tmp_path / "layout"))
    reader = make_client(registry.host).blob_reader(remote_blob(registry.host, seeded, size=seeded.layer.size + delta))
    with pytest.raises(DigestMismatchError) as caught:
        read_all(reader)
    assert caught.value.path == reader.name and caught.value.what == "blob"


def test_a_corrupt_byte_is_a_mismatch_before_the_last_piece(registry, proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/blobs/sha256:", "corrupt_body", response_bytes=12345))
    reader = make_client(proxy.host).blob_reader(remote_blob(proxy.host, seeded))
    yielded = 0
    with pytest.raises(DigestMismatchError) as caught:
        for piece in reader.views():
            yielded += len(piece)
    assert caught.value.expected == str(seeded.layer_digest) and caught.value.what == "blob"
    assert yielded == seeded.layer.size - seeded.layer.size % CHUNK_BYTES  # the last piece never left


def test_a_read_that_breaks_off_resumes_with_range(registry, proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    cut = CHUNK_BYTES + 300_000
    proxy.add(Rule("GET", "/blobs/sha256:", "reset_response", response_bytes=cut))
    reader = make_client(proxy.host).blob_reader(remote_blob(proxy.host, seeded))
    assert read_all(reader)[0] == file_bytes(seeded.layer)
    first, resumed = proxy.requests("GET", "/blobs/sha256:")
    assert "range" not in first.headers and first.response_bytes == cut
    start = int(resumed.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut and resumed.status == 206 and resumed.response_bytes == seeded.layer.size - start
    assert cut - start <= READ_BYTES  # sent twice: what was on the way when the connection broke
    assert reader.resumes == 1 and reader.bytes_read == seeded.layer.size


def test_a_registry_that_ignores_range_has_the_start_skipped(registry, proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    cut = 2 * CHUNK_BYTES + 1000
    proxy.add(Rule("GET", "/blobs/sha256:", "reset_response", response_bytes=cut))
    proxy.add(Rule("GET", "/blobs/sha256:", "forward", drop_request_headers=("Range",)))
    reader = make_client(proxy.host).blob_reader(remote_blob(proxy.host, seeded))
    assert read_all(reader)[0] == file_bytes(seeded.layer)
    resumed = proxy.requests("GET", "/blobs/sha256:")[1]
    assert resumed.status == 200 and "range" in resumed.headers  # asked; the proxy dropped it on the way
    skipped = int(resumed.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert reader.bytes_read == seeded.layer.size + skipped


def test_a_206_from_elsewhere_in_the_blob_is_malformed(registry, proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/blobs/sha256:", "reset_response", response_bytes=CHUNK_BYTES // 2))
    last = seeded.layer.size - 1
    proxy.add(Rule("GET", "/blobs/sha256:", "headers", headers={"Content-Range": f"bytes {last}-{last}/{seeded.layer.size}"}))
    with pytest.raises(MalformedResponseError) as caught:
        read_all(make_client(proxy.host).blob_reader(remote_blob(proxy.host, seeded)))
    assert caught.value.temporary


def test_resumes_are_bounded_by_the_retry_policy(registry, proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/blobs/sha256:", "reset_response", response_bytes=100_000, times=-1))
    reader = make_client(proxy.host, max_attempts=2).blob_reader(remote_blob(proxy.host, seeded))
    with pytest.raises(RegistryError) as caught:
        read_all(reader)
    assert caught.value.temporary and caught.value.status is None and "broke off 3 times" in str(caught.value)
    assert reader.resumes == 2 and len(proxy.requests("GET", "/blobs/sha256:")) == 3


def test_an_unknown_blob_is_a_404(registry, make_client):
    reader = make_client(registry.host).blob_reader(RegistryBlob(registry.host, REPO, Digest.sha256_of(b"nothing"), 7))
    with pytest.raises(RegistryError) as caught:
        read_all(reader)
    assert caught.value.status == 404 and not caught.value.temporary


def test_a_cancelled_run_stops_the_read(registry, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    client = make_client(registry.host)
    pieces = client.blob_reader(remote_blob(registry.host, seeded)).views()
    next(pieces)
    client.cancel.set()
    with pytest.raises(Cancelled):
        next(pieces)


# -- uploads of a stream -------------------------------------------------------------


def copy_blob(source: RegistryClient, destination: RegistryClient, blob: RegistryBlob, repository: str = "mirror/dst") -> tuple[int, BlobUpload, BlobReader]:
    reader = source.blob_reader(blob)
    upload = BlobUpload(destination.start_upload(repository))
    return destination.upload_blob(repository, upload, reader, blob.digest), upload, reader


def target_blob(target: Registry, digest: Digest, repository: str = "mirror/dst") -> bytes:
    import requests

    response = requests.get(f"{target.url}/v2/{repository}/blobs/{digest}", timeout=30)
    assert response.status_code == 200
    return response.content


def test_an_image_is_mirrored_byte_for_byte(registry, target, tmp_path, make_client):
    """A whole image: blobs streamed from the source registry, the manifest read and
    written as it is; skopeo, an independent client, checks what arrived."""
    seeded = seed(registry, str(tmp_path / "layout"))
    source, destination = make_client(registry.host), make_client(target.host)
    for digest, size in ((seeded.config_digest, seeded.config.size), (seeded.layer_digest, seeded.layer.size)):
        sent, _, reader = copy_blob(source, destination, RegistryBlob(registry.host, REPO, digest, size))
        assert sent == size and reader.bytes_read == size
    fetched = source.get_manifest(REPO, "1.0")
    assert destination.put_manifest("mirror/dst", "1.0", fetched.media_type, fetched.raw) == seeded.manifest_digest
    pulled = pull_and_verify(target, "mirror/dst:1.0", str(tmp_path / "pulled"))
    assert pulled[0].manifest_digest == str(seeded.manifest_digest) and pulled[0].diff_ids == seeded.diff_ids
    # the config (one piece): one PUT; the layer: its data in a PATCH, its last piece
    # (checked before it is sent) with the committing PUT
    assert target.count("PATCH") == 1


@pytest.mark.parametrize("chunk_min", [None, "700001"])
def test_a_stream_in_chunks_is_read_once(registry, target, target_proxy, tmp_path, make_client, chunk_min):
    """Above the monolithic limit, or when the registry asks for a minimum chunk,
    PATCH chunks are cut from one read: no byte is read twice."""
    seeded = seed(registry, str(tmp_path / "layout"))
    if chunk_min:
        target_proxy.add(Rule("POST", "/blobs/uploads/", "headers", headers={"OCI-Chunk-Min-Length": chunk_min}))
        destination = make_client(target_proxy.host, chunk_size_bytes=300_000)
    else:
        destination = make_client(target_proxy.host, monolithic_limit_bytes=1 << 20, chunk_size_bytes=300_000)
    sent, _, reader = copy_blob(make_client(registry.host), destination, remote_blob(registry.host, seeded))
    assert sent == seeded.layer.size and reader.bytes_read == seeded.layer.size
    chunk = int(chunk_min) if chunk_min else 300_000
    patches = target_proxy.requests("PATCH")
    assert len(patches) == -(-seeded.layer.size // chunk) and all(p.status == 202 for p in patches)
    assert target_blob(target, seeded.layer_digest) == file_bytes(seeded.layer)


def test_a_source_reset_mid_upload_resumes_the_read_with_range(registry, proxy, target, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/blobs/sha256:", "reset_response", response_bytes=CHUNK_BYTES + 12345))
    destination = make_client(target.host)
    sent, upload, reader = copy_blob(make_client(proxy.host), destination, remote_blob(proxy.host, seeded))
    assert sent == seeded.layer.size
    first, resumed = proxy.requests("GET", "/blobs/sha256:")
    assert "range" not in first.headers and resumed.headers["range"].startswith("bytes=") and resumed.status == 206
    assert first.response_bytes + resumed.response_bytes - seeded.layer.size <= CHUNK_BYTES  # re-read on the wire
    assert reader.resumes == 1 and reader.bytes_read == seeded.layer.size
    assert target.count("POST", "/blobs/uploads/") == 1  # the same upload went on
    assert target_blob(target, seeded.layer_digest) == file_bytes(seeded.layer)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_corrupt_source_byte_commits_nothing(registry, proxy, target, tmp_path, make_client, chunked):
    """The mismatch is known before the last piece is sent: the body stops short of
    its Content-Length, upload_blob raises the DigestMismatchError itself (not the
    transport error the HTTP stack saw) and cancels the session."""
    seeded = seed(registry, str(tmp_path / "layout"))
    proxy.add(Rule("GET", "/blobs/sha256:", "corrupt_body", response_bytes=CHUNK_BYTES + 1))
    options = {"monolithic_limit_bytes": 1 << 20, "chunk_size_bytes": 700_000} if chunked else {}
    destination = make_client(target.host, **options)
    upload = BlobUpload(destination.start_upload("mirror/dst"))
    with pytest.raises(DigestMismatchError) as caught:
        destination.upload_blob("mirror/dst", upload, make_client(proxy.host).blob_reader(remote_blob(proxy.host, seeded)), seeded.layer_digest)
    assert type(caught.value) is DigestMismatchError
    assert caught.value.path == f"docker://{proxy.host}/{REPO}@{seeded.layer_digest}" and caught.value.what == "blob"
    assert destination.head_blob("mirror/dst", seeded.layer_digest) is None
    assert destination.bytes_sent < seeded.layer.size
    assert target.count("DELETE", "/blobs/uploads/") == 1
    with pytest.raises(UploadGoneError):
        destination.upload_status("mirror/dst", upload)  # the session is gone
    assert not any("digest=" in line and '" 201 ' in line for line in target.access_log())


def test_an_interrupted_stream_upload_starts_a_new_session_and_read(registry, target, target_proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    target_proxy.add(Rule("PATCH", "/blobs/uploads/", "reset", after_body_bytes=LAYER_BYTES // 2))  # the data's request
    destination = make_client(target_proxy.host)
    reader = make_client(registry.host).blob_reader(remote_blob(registry.host, seeded))
    upload = BlobUpload(destination.start_upload("mirror/dst"))
    first = upload.session.location
    sent = destination.with_retries(lambda: destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest), "copy")
    assert sent == seeded.layer.size and upload.session.location != first
    assert len(target_proxy.requests("POST", "/blobs/uploads/")) == 2
    assert len(target_proxy.requests("DELETE", "/blobs/uploads/")) == 1  # the broken session cancelled
    assert reader.bytes_read > seeded.layer.size  # read again from its first byte
    assert target_blob(target, seeded.layer_digest) == file_bytes(seeded.layer)


def test_a_commit_whose_answer_was_lost_is_not_sent_again(registry, target, target_proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    target_proxy.add(Rule("PUT", r"/blobs/uploads/.*digest=", "reset_after_response"))
    destination = make_client(target_proxy.host)
    reader = make_client(registry.host).blob_reader(remote_blob(registry.host, seeded))
    upload = BlobUpload(destination.start_upload("mirror/dst"))
    with pytest.raises(RegistryError) as caught:
        destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest)
    assert caught.value.temporary and upload.interrupted
    assert destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest) == 0
    assert reader.bytes_read == seeded.layer.size and len(target_proxy.requests("POST", "/blobs/uploads/")) == 1
    assert not upload.interrupted and upload.offset == seeded.layer.size


class _NotYet(Exception):
    pass


def test_a_staged_stream_commits_later_without_reading_again(registry, target, tmp_path, make_client):
    """``before_commit`` stops the commit after every chunk is sent (an image still
    being checked): the next call asks where the upload is and commits."""
    seeded = seed(registry, str(tmp_path / "layout"))
    destination = make_client(target.host, chunk_size_bytes=1 << 20)
    reader = make_client(registry.host).blob_reader(remote_blob(registry.host, seeded))
    upload = BlobUpload(destination.start_upload("mirror/dst"))

    def not_yet() -> None:
        raise _NotYet()

    with pytest.raises(_NotYet):
        destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest, before_commit=not_yet)
    assert destination.head_blob("mirror/dst", seeded.layer_digest) is None
    assert destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest) == 0
    assert reader.bytes_read == seeded.layer.size
    assert target_blob(target, seeded.layer_digest) == file_bytes(seeded.layer)


def test_a_416_to_a_streamed_chunk_starts_over(registry, target, target_proxy, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    target_proxy.add(Rule("PATCH", "/blobs/uploads/", "status", status=416, skip=1))
    destination = make_client(target_proxy.host, monolithic_limit_bytes=1 << 20, chunk_size_bytes=1 << 20)
    reader = make_client(registry.host).blob_reader(remote_blob(registry.host, seeded))
    upload = BlobUpload(destination.start_upload("mirror/dst"))
    with pytest.raises(UploadGoneError):
        destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest)
    assert len(target_proxy.requests("DELETE", "/blobs/uploads/")) == 1
    # the caller's next attempt: a new session (the layer path starts one on UploadGoneError)
    assert copy_blob(make_client(registry.host), destination, remote_blob(registry.host, seeded))[0] == seeded.layer.size


def test_a_cancelled_run_stops_a_streaming_upload(registry, target, tmp_path, make_client):
    seeded = seed(registry, str(tmp_path / "layout"))
    destination = make_client(target.host)
    source = make_client(registry.host)
    upload = BlobUpload(destination.start_upload("mirror/dst"))

    def cancel_soon(sent: int) -> None:
        if sent >= CHUNK_BYTES:
            destination.cancel.set()

    with pytest.raises(Cancelled):
        destination.upload_blob("mirror/dst", upload, source.blob_reader(remote_blob(registry.host, seeded)), seeded.layer_digest, on_progress=cancel_soon)
    destination.cancel.clear()
    assert destination.head_blob("mirror/dst", seeded.layer_digest) is None


def test_reads_run_in_parallel_on_one_client(registry, proxy, tmp_path, make_client):
    """Three threads read a blob through one client at once: the proxy holds the
    first answer until all three requests are in flight, which only reads that run
    side by side can bring about (one after another, the first is let go after
    hold_s and the peak stays 1)."""
    seeded = seed(registry, str(tmp_path / "layout"))
    reads = proxy.add(Rule("GET", "/blobs/sha256:", "forward", times=-1, hold_until_in_flight=3))
    client = make_client(proxy.host)
    results: list[bytes] = []

    def read() -> None:
        results.append(hashlib.sha256(read_all(client.blob_reader(remote_blob(proxy.host, seeded)))[0]).digest())

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert results == [bytes.fromhex(seeded.layer_digest.hex)] * 3
    assert client.bytes_read == 3 * seeded.layer.size
    assert reads.peak_in_flight == 3 and reads.fired == 3


def test_a_401_to_a_streamed_chunk_ends_the_attempt_and_the_next_starts_over(registry, target, target_proxy, tmp_path, clients):
    """A chunk read from a stream cannot be resent after a fresh token (it was read
    once): the attempt ends with UploadGoneError, its session cancelled, and the next
    attempt reads the blob again into a new session."""
    seeded = seed(registry, str(tmp_path / "layout"))
    target_proxy.add(Rule("PATCH", "/blobs/uploads/", "status", status=401, headers={"WWW-Authenticate": 'Basic realm="test"'}, skip=1))
    destination = RegistryClient(target_proxy.host, RegistryOptions(insecure=True, monolithic_limit_bytes=1 << 20, chunk_size_bytes=1 << 20), Credentials("mirror", "not-a-secret"))
    clients.append(destination)
    reader = _client(registry.host).blob_reader(remote_blob(registry.host, seeded))
    clients.append(reader.client)
    upload = BlobUpload(destination.start_upload("mirror/dst"))
    first = upload.session.location
    with pytest.raises(UploadGoneError) as caught:
        destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest)
    assert caught.value.temporary and caught.value.status == 401
    assert [seen.status for seen in target_proxy.requests("PATCH")] == [202, 401]  # nothing resent
    assert len(target_proxy.requests("DELETE", "/blobs/uploads/")) == 1
    assert destination.upload_blob("mirror/dst", upload, reader, seeded.layer_digest) == seeded.layer.size
    assert upload.session.location != first and len(target_proxy.requests("POST", "/blobs/uploads/")) == 2
    assert target_blob(target, seeded.layer_digest) == file_bytes(seeded.layer)
