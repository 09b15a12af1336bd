"""The session's TLS contexts, made once per trust setting and shared by every
connection, still verify what they verified: a CA not trusted is refused, a
certificate for another host is refused, the right one is accepted on every
connection, and an ``--insecure`` host is not verified.

Our fault proxy speaks TLS (a certificate of our CA for 127.0.0.1 and localhost)
in front of the real registry, on 127.0.0.1 and on another loopback address the
certificate does not name.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator

import pytest
from fault_proxy import FaultProxy
from tls import make_tls

from batchpush.registry.client import RegistryClient, RegistryOptions
from batchpush.registry.errors import RegistryError

#: a loopback address the certificate does not name
OTHER_LOOPBACK = "127.0.0.2"


@pytest.fixture
def tls_fronts(registry, tmp_path) -> Iterator[tuple[str, FaultProxy, FaultProxy]]:
    """Our CA, and TLS proxies before the registry: one its certificate names, one it does not."""
    ca, cert, key = make_tls(str(tmp_path / "certs"))
    named, other = FaultProxy(registry.host, tls=(cert, key)), FaultProxy(registry.host, bind=OTHER_LOOPBACK, tls=(cert, key))
    yield ca, named, other
    named.stop()
    other.stop()


def ping(host: str, options: RegistryOptions, times: int = 1) -> RegistryError | None:
    """``times`` pings of ``host``, each on a new client (new connections); the error, if any."""
    for _ in range(times):
        client = RegistryClient(host, options)
        try:
            client.ping()
        except RegistryError as exc:
            return exc
        finally:
            client.close()
    return None


def test_trusted_ca_and_the_named_host_are_accepted_on_every_connection(tls_fronts):
    ca, named, _ = tls_fronts
    assert ping(named.host, RegistryOptions(ca_file=ca), times=3) is None
    client = RegistryClient(named.host, RegistryOptions(ca_file=ca))
    try:
        # several connections of one session, made at once: each goes through the shared context
        with cf.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda _: client.head_manifest("any/repo", "missing", "application/json") is None, range(8)))
    finally:
        client.close()


def test_a_ca_not_trusted_is_refused(tls_fronts):
    _, named, _ = tls_fronts
    error = ping(named.host, RegistryOptions())
    assert error is not None and error.permanent and "TLS verification failed" in error.message


def test_a_certificate_for_another_host_is_refused(tls_fronts):
    ca, _, other = tls_fronts
    error = ping(other.host, RegistryOptions(ca_file=ca))
    assert error is not None and error.permanent and "TLS verification failed" in error.message


def test_an_insecure_host_is_not_verified(tls_fronts):
    _, named, other = tls_fronts
    assert ping(named.host, RegistryOptions(insecure=True)) is None
    assert ping(other.host, RegistryOptions(insecure=True)) is None
