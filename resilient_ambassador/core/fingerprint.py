"""Short, stable hashes of values that must never be stored or sent as they are.

Rate-limit descriptors, cache keys and Redis keys are built from client input and from the
injected credential; both go through `fingerprint` so a key shows neither, and a key's length
does not depend on what a client sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def fingerprint(parts: Iterable[bytes], *, domain: bytes) -> str:
    """A 32-hex-digit hash of `parts` (length-prefixed, so ("ab", "c") != ("a", "bc")).
    `domain` separates uses: a cache key never equals a rate-limit key for the same parts."""
    h = hashlib.blake2b(domain, digest_size=16)
    h.update(encode_parts(parts))
    return h.hexdigest()


def encode_parts(parts: Iterable[bytes]) -> bytes:
    """`parts` as `fingerprint` hashes them, for a caller that hashes a constant prefix once
    (`hashlib`'s `copy()`) and appends the parts that vary: the keys come out the same."""
    return b"".join([len(part).to_bytes(4, "big") + part for part in parts])
