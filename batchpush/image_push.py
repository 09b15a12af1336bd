"""One image to one repository: layers, config, manifest, tag (the seed's pushV2Tag).

An index (multi-arch) is pushed whole: every child manifest by digest, then the
index by tag. A manifest is written only after every blob it names has arrived.
The image's thread waits for its layers' checks and hands each checked layer to
the registry's upload pool, so an upload thread never waits on a compression.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes as mt
from . import waits
from .digest import Digest
from .layer_push import ImageGate, LayerOutcome, LayerPusher, LayerResult, Staged
from .prepare import PendingManifest, PreparedIndex, PreparedLayer, PreparedNode
from .registry.errors import RegistryError
from .sources.base import SourceManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PushedManifest:
    digest: Digest
    size: int
    media_type: str
    layers: tuple[LayerResult, ...] = field(default=())


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_bytes(source: SourceManifest, layers: list[LayerResult]) -> bytes:
    """The manifest to push: the source's own bytes when no layer changed (so its
    digest is kept), else the source's document with the layer descriptors rewritten
    (a legacy docker-archive gets a Docker schema2 manifest)."""
    if source.document is None:
        return _dump({
            "schemaVersion": 2,
            "mediaType": mt.DOCKER_MANIFEST,
            "config": source.config_descriptor.to_json(),
            "layers": [_layer_json({}, layer, urls) for layer, urls in zip(layers, (sl.descriptor.urls for sl in source.layers), strict=True)],
        })
    document = copy.deepcopy(source.document)
    changed = False
    for entry, layer in zip(document["layers"], layers, strict=True):
        # the blob's bytes decide: a blob the batch already placed may come back with
        # another descriptor's media type (an artifact's empty ``{}`` is its config
        # and a layer at once), and the source's own descriptor is the right one
        if (entry.get("digest"), entry.get("size")) != (str(layer.digest), layer.size):
            entry.update(_layer_json(entry, layer, ()))
            changed = True
    return _dump(document) if changed else source.raw  # type: ignore[return-value]


def _layer_json(entry: dict[str, Any], layer: LayerResult, urls: tuple[str, ...]) -> dict[str, Any]:
    out = dict(entry)
    out.update({"mediaType": layer.media_type, "digest": str(layer.digest), "size": layer.size})
    if urls:
        out["urls"] = list(urls)
    return out


def index_bytes(node: PreparedIndex, children: list[PushedManifest]) -> bytes:
    """The index to push: its child descriptors pointed at what was pushed."""
    document = copy.deepcopy(node.source.document)
    changed = False
    for entry, child in zip(document["manifests"], children, strict=True):
        if (entry.get("digest"), entry.get("size")) != (str(child.digest), child.size):
            entry.update({"digest": str(child.digest), "size": child.size})
            changed = True
    return _dump(document) if changed else node.source.raw


def _done(layer: PreparedLayer) -> cf.Future[PreparedLayer]:
    future: cf.Future[PreparedLayer] = cf.Future()
    future.set_result(layer)
    return future


def _as_prepared(layer: PreparedLayer) -> LayerResult:
    return LayerResult(layer.diff_id, layer.digest, layer.size, layer.media_type, LayerOutcome.UPLOADED)


def predict(node: PreparedNode) -> PushedManifest:
    """The manifest (or index) that pushing ``node`` produces when every layer goes up
    as prepared: the cron fast path compares its digest with what the tag resolves to."""
    if isinstance(node, PreparedIndex):
        data = index_bytes(node, [predict(child) for child in node.children])
    else:
        data = manifest_bytes(node.source, [_as_prepared(layer) for layer in node.layers])
    return PushedManifest(Digest.sha256_of(data), len(data), node.source.media_type)


class ImagePusher:
    """Pushes prepared images to one target repository through a LayerPusher."""

    def __init__(self, layers: LayerPusher, executor: cf.Executor) -> None:
        self.layers = layers
        self.client = layers.client
        self.repository = layers.repository
        self.executor = executor

    def up_to_date(self, node: PreparedNode, tag: str) -> PushedManifest | None:
        """The cron fast path: one HEAD. If the tag already resolves to the digest we
        would push, the image is done, with no blob request at all. The HEAD is only
        sent when the metadata store saw the image's config go to this repository
        (a re-run): for an image this store never pushed there, it would be one
        request per image wasted on a cold push (pushing it again is correct too)."""
        if not self._pushed_here_before(node):
            return None
        expected = predict(node)
        return expected if self.tag_digest(tag) == expected.digest else None

    def tag_digest(self, tag: str) -> Digest | None:
        current = self.tag_manifest(tag)
        return current[0] if current is not None else None

    def tag_manifest(self, tag: str) -> tuple[Digest, int] | None:
        """What the target's tag names now, its digest and size (one HEAD); None if
        nothing, or if the HEAD fails: it is only a shortcut, the full push decides."""
        try:
            return self.client.with_retries(lambda: self.client.head_manifest(self.repository, tag, mt.MANIFEST_ACCEPT), f"manifest {tag}")
        except RegistryError as exc:
            log.info("%s: the tag HEAD failed (%s); pushing in full", tag, exc)
            return None

    def _pushed_here_before(self, node: PreparedNode) -> bool:
        if isinstance(node, PreparedIndex):
            return all(self._pushed_here_before(child) for child in node.children)
        name = self.layers.target.name
        return any(entry.source_repository == name for entry in self.layers.store.get_metadata(node.config.key))

    def push(self, node: PreparedNode, tag: str) -> PushedManifest:
        """Push ``node`` and tag it; raises on any failure before the manifest is written."""
        return self._push_node(node, tag)

    def push_streaming(self, pending: PendingManifest, tag: str) -> PushedManifest:
        """Push an image whose layers are still compressing: each layer starts as soon
        as it is checked, and no blob is committed nor mounted before all are (so a
        layer that lies still means nothing is pushed for the image)."""
        gate = ImageGate(pending.layers, self.client.cancel)
        return self._push_image(pending.source, pending.layers, pending.config, tag, gate=gate)

    def _push_node(self, node: PreparedNode, reference: str | None) -> PushedManifest:
        if isinstance(node, PreparedIndex):
            return self._push_index(node, reference)
        return self._push_image(node.source, tuple(_done(layer) for layer in node.layers), node.config, reference)

    def _push_image(self, source: SourceManifest, checks: Sequence[cf.Future[PreparedLayer]], config: PreparedLayer, reference: str | None, *, gate: ImageGate | None = None) -> PushedManifest:
        """Each layer as soon as it is checked, and the config, on the registry's
        pool; then the manifest. With a gate, what must wait for it comes back
        ``Staged`` and this thread (not an upload thread) waits for the gate, then
        has them finished; so does a layer whose blob another push has staged, and
        this thread waits for that push's commit (never an upload thread: the
        commit needs one). The first failure is raised (a layer's own failed check
        before the others' consequences), staged sessions are cancelled, and no
        manifest is written."""
        cancel = self.client.cancel
        positions: dict[cf.Future[PreparedLayer], list[int]] = {}
        for position, check in enumerate(checks):
            positions.setdefault(check, []).append(position)
        pushes: dict[int, cf.Future[LayerResult | Staged]] = {-1: self.executor.submit(self.layers.push, config, is_config=True, gate=gate)}
        try:
            for check in waits.as_completed(positions, cancel):
                if check.exception() is not None:
                    break  # raised below, once the pushes under way have stopped
                for position in positions[check]:
                    pushes[position] = self.executor.submit(self.layers.push, check.result(), gate=gate)
        finally:
            # pushes under way end on their own (a gated one returns Staged at once)
            waits.wait_done(pushes.values(), cancel)
        try:
            waits.wait_done(checks, cancel)
            for check in checks:
                check.result()
            if gate is not None:
                gate.wait()
            staged = {position: push.result() for position, push in pushes.items()}
        except BaseException:
            self._abandon(pushes.values())
            raise
        finished: dict[int, cf.Future[LayerResult]] = {}
        # this image's own staged data first: another image's layer may wait for it
        for position, outcome in sorted(((p, o) for p, o in staged.items() if isinstance(o, Staged)), key=lambda item: item[1].waits_for is not None):
            if outcome.waits_for is not None:
                waits.event(outcome.waits_for, cancel)
            finished[position] = self.executor.submit(self.layers.finish, outcome)
        waits.wait_done(finished.values(), cancel)
        results = {position: finished[position].result() if position in finished else outcome for position, outcome in staged.items()}
        layers = [results[position] for position in range(len(checks))]
        assert all(isinstance(layer, LayerResult) for layer in layers)
        data = manifest_bytes(source, layers)  # type: ignore[arg-type]
        digest = self._put(reference, source.media_type, data)
        return PushedManifest(digest, len(data), source.media_type, tuple(layers))  # type: ignore[arg-type]

    def _abandon(self, pushes: Iterable[cf.Future[LayerResult | Staged]]) -> None:
        """The image fails: every staged layer's session is cancelled."""
        for push in pushes:
            if push.done() and not push.cancelled() and push.exception() is None:
                outcome = push.result()
                if isinstance(outcome, Staged):
                    self.layers.abandon(outcome)

    def _put(self, tag: str | None, media_type: str, data: bytes, children: Iterable[Digest] = ()) -> Digest:
        """PUT a manifest by ``tag`` (None: by its digest) under the retry policy (a
        5xx is retried; a digest that differs from ours is not), never at the same
        time as another PUT naming it or one of its ``children`` in the repository
        (``PushState.manifest_writes``). A manifest this batch PUT here already is
        not PUT again by digest (another tag of it, an index's child, is there)."""
        digest = Digest.sha256_of(data)
        state, registry = self.layers.state, self.layers.target.registry
        reference = tag or str(digest)
        with state.manifest_writes(registry, self.repository, (digest, *children), self.client.cancel):
            if tag is None and state.known_manifest(registry, self.repository, digest):
                return digest
            digest = self.client.with_retries(lambda: self.client.put_manifest(self.repository, reference, media_type, data), f"manifest {reference}")
            state.add_manifest(registry, self.repository, digest)
        return digest

    def _push_index(self, node: PreparedIndex, reference: str | None) -> PushedManifest:
        children = [self._push_node(child, None) for child in node.children]
        data = index_bytes(node, children)
        digest = self._put(reference, node.source.media_type, data, (child.digest for child in children))
        layers = tuple(layer for child in children for layer in child.layers)
        return PushedManifest(digest, len(data), node.source.media_type, layers)


__all__ = ["ImagePusher", "LayerOutcome", "PushedManifest", "manifest_bytes", "predict"]
