"""A slow uplink: a body keeps going while bytes move.

While a body is sent, the socket's timeout is the connect timeout, and Python's
``sendall`` bounds the whole piece it is given (since 3.5), not a silence: once the
socket buffers are full, a piece that takes longer than the timeout to drain failed
the upload although bytes were moving. Here the real registry sits behind our
proxy, which reads request bodies slowly; the connect timeout is lowered for the
test (the same code path, in seconds a test can wait) so that one 1 MiB piece of
the body takes longer than it to drain. skopeo reads back what arrived.
"""

from __future__ import annotations

from conftest import pull_and_verify
from fault_proxy import FaultProxy
from images import LayoutWriter, random_layer

from batchpush.registry import client as registry_client

#: the connect timeout (the socket's timeout while a body is sent) in this test
CONNECT_TIMEOUT_S = 2.5
#: how fast the proxy reads request bodies: a 1 MiB piece drains in about 3.5 s
BODY_BYTES_PER_S = 300_000
#: about twice what loopback's socket buffers hold here (4 MiB of send buffer, and
#: the proxy's receive buffer): the last pieces each wait for the proxy to read
LAYER_BYTES = 9 << 20


def test_a_body_slower_than_the_connect_timeout_per_piece_arrives(registry, tmp_path, monkeypatch, batchpush):
    monkeypatch.setattr(registry_client, "CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S)
    writer = LayoutWriter(str(tmp_path / "layout"))
    descriptor, built = writer.image([random_layer(41, LAYER_BYTES)])
    writer.tag(descriptor, "1.0")
    proxy = FaultProxy(registry.host)
    proxy.throttle_bytes_per_s = BODY_BYTES_PER_S
    try:
        run = batchpush("push", f"oci:{tmp_path}/layout:1.0", f"{proxy.host}/slow/app:1.0", "--insecure", proxy.host)
        assert run.code == 0, run.err
        (upload,) = [seen for seen in proxy.requests() if seen.body_bytes > LAYER_BYTES]  # sent once: no attempt failed
        assert upload.status == 201
    finally:
        proxy.stop()
    assert pull_and_verify(registry, "slow/app:1.0", str(tmp_path / "pulled"))[0].diff_ids == built.diff_ids
