"""Digest value type with strict validation, and streaming hash helpers."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import BatchPushError

#: algorithm -> length of its lowercase hex encoding
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")

#: read size for every streaming hash and copy in batchpush
CHUNK_BYTES = 1 << 20


class InvalidDigestError(BatchPushError):
    kind = "digest"

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid digest {text!r}: {problem}")
        self.text = text


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A content digest ``algorithm:hex``; only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate; raises InvalidDigestError, never builds a path from junk."""
        if not isinstance(text, str):
            raise InvalidDigestError(repr(text), "not a string")
        algorithm, sep, hex_ = text.partition(":")
        if not sep:
            raise InvalidDigestError(text, "missing algorithm")
        expected = _HEX_LENGTHS.get(algorithm)
        if expected is None:
            raise InvalidDigestError(text, f"unsupported algorithm {algorithm!r}")
        if len(hex_) != expected or not _HEX.fullmatch(hex_):
            raise InvalidDigestError(text, f"{algorithm} needs {expected} lowercase hex digits")
        return cls(algorithm, hex_)

    @classmethod
    def of(cls, algorithm: str, data: bytes) -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @classmethod
    def sha256_of(cls, data: bytes) -> Digest:
        return cls.of("sha256", data)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
