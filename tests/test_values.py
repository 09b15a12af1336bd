"""Digest, reference and challenge parsing; the compression recipe."""

from __future__ import annotations

import gzip
import hashlib
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpush.compress import RECIPE, compress_to_spool, fingerprint_blob
from batchpush.digest import Digest, InvalidDigestError
from batchpush.errors import BatchPushError, ReferenceError_
from batchpush.reference import parse_reference
from batchpush.registry.auth import parse_challenges
from batchpush.registry.errors import redact_url
from batchpush.sources import FileRange, UsageError, open_source
from batchpush.sources.docker_archive import DockerArchive
from batchpush.sources.oci_layout import OCILayout


@pytest.mark.parametrize("text", ["sha256:" + "a" * 64, "sha512:" + "0" * 128])
def test_digest_accepts(text):
    assert str(Digest.parse(text)) == text


@pytest.mark.parametrize("text", ["", "sha256:", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256:../../etc/passwd", "a" * 64, "sha256:" + "g" * 64])
def test_digest_refuses(text):
    with pytest.raises(InvalidDigestError):
        Digest.parse(text)


@given(st.text(max_size=200))
def test_digest_parser_never_crashes(text):
    try:
        digest = Digest.parse(text)
    except InvalidDigestError:
        return
    assert "/" not in digest.hex and ".." not in digest.hex


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag"),
    [
        ("127.0.0.1:5000/team/app:1.2", "127.0.0.1:5000", "team/app", "1.2"),
        ("registry.example:5000/team/app", "registry.example:5000", "team/app", None),
        ("localhost/app", "localhost", "app", None),
        ("ubuntu", "docker.io", "library/ubuntu", None),
        ("user/app:latest", "docker.io", "user/app", "latest"),
        ("[::1]:5000/a/b:t", "[::1]:5000", "a/b", "t"),
    ],
)
def test_reference_parsing(text, registry, repository, tag):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)


@pytest.mark.parametrize("text", ["", "127.0.0.1:5000/Team/app", "reg.example/a//b", "reg.example/a:b:c", "reg.example/app:" + "t" * 200, "reg.example/a@sha256:zz"])
def test_reference_refuses(text):
    with pytest.raises(ReferenceError_):
        parse_reference(text)


# distribution/reference's grammar, written out again here (not the module's own
# patterns) so that a parser that lets a bad name through is caught
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
#: texts shaped like references, many of them valid, many a character off
_REFERENCE_LIKE = st.from_regex(r"(?:[A-Za-z0-9.:\[\]-]{1,20}/)?[a-zA-Z0-9._/-]{1,40}(?::[A-Za-z0-9_.:-]{1,10})?(?:@sha256:[0-9a-fA-F]{62,65})?", fullmatch=True)


@given(st.text(max_size=300) | _REFERENCE_LIKE)
def test_reference_parser_never_crashes(text):
    """Nothing but a ReferenceError_ escapes; what it refuses it names (the input
    and a problem), and what it accepts is well-formed and round-trips."""
    try:
        ref = parse_reference(text)
    except ReferenceError_ as exc:
        assert exc.problem and exc.reference == (text if text and len(text) <= 4096 else text[:100])
        assert repr(exc.reference) in str(exc)
        return
    assert re.fullmatch(_DOMAIN, ref.registry) and re.fullmatch(_PATH, ref.repository), ref
    assert len(ref.name) <= 255 and (ref.tag is None or re.fullmatch(_TAG, ref.tag)), ref
    assert (ref.digest is not None) == ("@" in text)
    assert parse_reference(str(ref)) == ref


def test_challenge_parsing():
    [bearer] = parse_challenges('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"}
    [basic] = parse_challenges('Basic realm="basic-realm"')
    assert basic.scheme == "basic" and basic.params["realm"] == "basic-realm"
    both = parse_challenges('Basic realm="x", Bearer realm="https://t/token",service=s')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert both[1].params["service"] == "s"


def test_redact_url_drops_query_and_userinfo():
    assert redact_url("http://u:p@127.0.0.1:5000/v2/a/blobs/uploads/abc?_state=SECRET&digest=x") == "http://127.0.0.1:5000/v2/a/blobs/uploads/abc"


def test_recipe_is_deterministic_and_round_trips(tmp_path):
    data = os.urandom(300_000) + b"abc" * 2_000_000
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    blob = FileRange(str(path), 0, len(data))
    spools = [tmp_path / "s1", tmp_path / "s2"]
    results = []
    for spool in spools:
        spool.mkdir()
        results.append(compress_to_spool(blob, str(spool)))
    assert results[0].digest == results[1].digest
    assert results[0].recipe == RECIPE == "gzip-isal-l1-b16m"
    compressed = open(results[0].path, "rb").read()
    assert compressed[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0
    assert gzip.decompress(compressed) == data
    assert str(results[0].diff_id) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert str(results[0].digest) == "sha256:" + hashlib.sha256(compressed).hexdigest()
    assert len(fingerprint_blob(blob)) == 32


def test_file_range_reads_in_place_and_detects_truncation(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert FileRange(str(path), 2, 5).read_all(100) == b"23456"
    with pytest.raises(BatchPushError, match="truncated"):
        FileRange(str(path), 8, 5).read_all(100)


def test_source_spec_parsing():
    oci = open_source("oci:./layouts/app:1.2")
    assert isinstance(oci, OCILayout) and (oci.path, oci.tag) == ("./layouts/app", "1.2")
    archive = open_source("docker-archive:./app.tar:team/app:1.0")
    assert isinstance(archive, DockerArchive) and (archive.path, archive.ref) == ("./app.tar", "team/app:1.0")
    assert open_source("docker-archive:/x/app.tar").ref is None  # type: ignore[attr-defined]
    for bad in ("docker://x", "oci:", "dir:/x"):
        with pytest.raises(UsageError):
            open_source(bad)


def test_log_lines_lose_query_strings_and_tokens():
    import logging

    from batchpush.logs import RedactingFormatter

    formatter = RedactingFormatter("%(message)s")
    for message in (
        'http://127.0.0.1:5000 "PUT /v2/a/blobs/uploads/u?_state=SECRET&digest=sha256%3Aab HTTP/1.1" 201 0',
        "GET https://auth.example/token?scope=repository:a:push&account=SECRET",
        "Authorization: Bearer SECRET",
    ):
        record = logging.LogRecord("x", logging.DEBUG, __file__, 1, message, None, None)
        assert "SECRET" not in formatter.format(record)


def test_blocks_compressed_by_several_workers_give_the_same_bytes(tmp_path):
    """A layer of several blocks, compressed by a pool of workers, is byte for byte
    what one process makes: the recipe does not depend on the parallelism."""
    import concurrent.futures as cf
    import multiprocessing
    import random

    from batchpush.blocks import RecompressedStream
    from batchpush.compress import BLOCK_BYTES
    from batchpush.digest import Digest
    from batchpush.errors import DigestMismatchError
    from batchpush.metadata import MetadataStore
    from batchpush.prepare import Preparer

    rng = random.Random(7)
    data = b"".join(rng.randbytes(1 << 20) if i % 3 == 0 else bytes([i]) * (1 << 20) for i in range(int(2.5 * BLOCK_BYTES) >> 20))
    path = tmp_path / "big.tar"
    path.write_bytes(data)
    blob = FileRange(str(path), 0, len(data))
    (tmp_path / "inline").mkdir()
    inline = compress_to_spool(blob, str(tmp_path / "inline"))
    (tmp_path / "pool").mkdir()
    store = MetadataStore(str(tmp_path / "md"))
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        preparer = Preparer(str(tmp_path / "pool"), store, pool)
        parallel = preparer._compress_pass(blob, None, None)
        # the stream made again from the source, from its first byte and from any
        # offset (a resumed upload): the same bytes, block boundaries included
        given = RecompressedStream(blob, parallel.digest, parallel.size, preparer._submit, preparer.window, preparer.cancel, blocks=parallel.blocks)
        learned = RecompressedStream(blob, parallel.digest, parallel.size, preparer._submit, preparer.window, preparer.cancel)
        whole = b"".join(bytes(v) for v in learned.views())  # learns each block's size and CRC
        assert learned.blocks == list(parallel.blocks)
        kept = open(parallel.path, "rb").read()
        first = parallel.blocks[0][0]
        for stream in (given, learned):
            for start in (1, 10, 11, 10 + first, 11 + first + 5, len(kept) - 8, len(kept) - 1):
                assert b"".join(bytes(v) for v in stream.views(start)) == kept[start:], start
        preparer.close()
    assert parallel.digest == inline.digest and parallel.size == inline.size
    assert whole == kept
    assert gzip.decompress(kept) == data
    assert sorted(os.listdir(tmp_path / "pool")) == [os.path.basename(parallel.path)]  # no block left behind
    assert parallel.path.startswith(os.path.join(tmp_path / "pool", parallel.digest.hex))
    # a stream whose source changed since is refused before its last piece
    lying = RecompressedStream(blob, Digest("sha256", "0" * 64), parallel.size, None, preparer.window, preparer.cancel)
    with pytest.raises(DigestMismatchError):
        for _ in lying.views():
            pass

    # a source shorter than it claims: a SourceError naming it, and nothing left in the spool
    os.unlink(parallel.path)
    short = FileRange(str(path), 0, len(data) + BLOCK_BYTES)
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        preparer = Preparer(str(tmp_path / "pool"), store, pool)
        with pytest.raises(BatchPushError, match=r"big\.tar"):
            preparer._compress_pass(short, None, None)
        preparer.close()
    assert os.listdir(tmp_path / "pool") == []


def test_proxies_come_from_the_environment_once_per_origin(monkeypatch):
    from batchpush.registry import transport

    transport._origin_proxies.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "registry.internal")
    try:
        assert transport.proxies_for("https://registry.example:5000/v2/")["https"] == "http://127.0.0.1:3128"
        assert transport.proxies_for("https://registry.internal/v2/x") == {}
    finally:
        transport._origin_proxies.cache_clear()


#: proxy settings and URLs on which our reading of the environment must agree with
#: requests' (which batchpush used until it spoke urllib3 directly)
PROXY_ENVIRONMENTS = [
    {"HTTPS_PROXY": "http://127.0.0.1:3128"},
    {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2", "http_proxy": "127.0.0.1:3129"},
    {"ALL_PROXY": "http://all:3128", "NO_PROXY": "internal,.corp.example,10.0.0.0/8,192.168.1.7,registry.example:5000"},
    {"HTTPS_PROXY": "http://p:3128", "no_proxy": "*"},
    {"HTTPS_PROXY": "http://p:3128", "HTTP_PROXY": "http://q:3128", "NO_PROXY": " ernal , localhost"},
    {"HTTPS_PROXY": "http://user:pa%40ss@p:3128", "NO_PROXY": "[::1],127.0.0.1"},
]
PROXIED_URLS = [
    "https://registry.example:5000/v2/",
    "https://registry.example/v2/",
    "https://registry.internal/v2/x",
    "http://internal:5000/v2/",
    "https://a.corp.example/v2/",
    "https://corp.example/v2/",
    "http://10.1.2.3:5000/v2/",
    "http://192.168.1.7/v2/",
    "http://192.168.1.8/v2/",
    "http://127.0.0.1:5000/v2/",
    "http://[::1]:5000/v2/",
    "http://localhost:5000/v2/",
]


@pytest.mark.parametrize("environment", PROXY_ENVIRONMENTS)
def test_proxies_agree_with_requests_rules(monkeypatch, environment):
    """For each environment and URL: the proxies we read, and the one a request
    takes, are requests' (``get_environ_proxies``, ``select_proxy``)."""
    import requests.utils

    from batchpush.registry import transport

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    transport._origin_proxies.cache_clear()
    try:
        for url in PROXIED_URLS:
            theirs = requests.utils.get_environ_proxies(url)
            assert transport.proxies_for(url) == theirs, url
            assert transport.proxy_for(url) == requests.utils.select_proxy(url, theirs), url
    finally:
        transport._origin_proxies.cache_clear()


def test_no_proxy_variable_reads_nothing_more(monkeypatch):
    from batchpush.registry import transport

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    transport._origin_proxies.cache_clear()
    assert transport.proxies_for("https://registry.example/v2/") == {}
    assert transport.proxy_for("https://registry.example/v2/") is None


def test_errors_cross_process_boundaries():
    """An error raised in a compression worker is pickled back: every kind must
    survive it with its fields (else the pool is declared broken)."""
    import pickle

    from batchpush.errors import DigestMismatchError, SourceError
    from batchpush.registry.errors import AuthError, RegistryError

    for error in (
        SourceError("/x/big.tar", "truncated: 5 bytes missing", image="app:1"),
        DigestMismatchError("/x/blob", "layer digest", "sha256:aa", "sha256:bb"),
        ReferenceError_("Bad/Ref", "uppercase"),
        RegistryError("PUT", "https://r.example/v2/x", 503, ("UNAVAILABLE",), "busy", retry_after_s=2.0),
        AuthError("GET", "https://r.example/v2/", 401, (), "denied"),
    ):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


@given(st.text(alphabet="ab-1. ", max_size=12))
def test_a_lazy_pattern_matches_as_its_compiled_pattern(text):
    from batchpush.patterns import LazyPattern

    lazy, compiled = LazyPattern(r"(a+)-?([0-9])?", re.ASCII), re.compile(r"(a+)-?([0-9])?", re.ASCII)

    def found(match):
        return match and (match.span(), match.groups())

    for method in ("match", "fullmatch", "search"):
        assert found(getattr(lazy, method)(text)) == found(getattr(compiled, method)(text))
        assert found(getattr(lazy, method)(text, 1)) == found(getattr(compiled, method)(text, 1))
    assert lazy.sub(r"<\1>", text) == compiled.sub(r"<\1>", text)
    assert lazy.sub(r"<\1>", text, 1) == compiled.sub(r"<\1>", text, 1)


def test_a_lazy_pattern_compiles_on_first_use_only():
    from batchpush.patterns import LazyPattern

    lazy = LazyPattern(r"x")
    assert lazy._compiled is None
    assert lazy.fullmatch("x")
    assert lazy._compiled is not None and lazy.compiled() is lazy._compiled
