"""Secret keys: CSPRNG generation, validation, and owner-only key files with a checksum.

A key file (format 2): b"TFKLKEY2", the key length and the owner's length (little-endian uint32 and
uint16), the owner (UTF-8: whom the key belongs to, e.g. a run and client id; may be empty), the key
(little-endian float32), then the SHA-256 of everything before it. Format 1 files (b"TFKLKEY1", no
owner) are still read; they belong to no one.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

from tfkl.files import atomic_write

_MAGIC_V1 = b"TFKLKEY1"
_HEADER_V1 = struct.Struct("<8sI")
_MAGIC = b"TFKLKEY2"
_HEADER = struct.Struct("<8sIH")
_DIGEST_SIZE = hashlib.sha256().digest_size


class KeyFormatError(ValueError):
    """A key or key file that cannot be used (wrong shape, dtype, non-finite, corrupt)."""


def secret_uniform(shape, seed=None) -> np.ndarray:
    """float32 values uniform in [0, 1) of `shape`, from the operating system's CSPRNG (`os.urandom`);
    a seed is only for reproducible experiments and must never be used for a real deployment."""
    shape = tuple(int(d) for d in np.atleast_1d(shape))
    size = int(np.prod(shape))
    if seed is None:
        bits = np.frombuffer(os.urandom(4 * size), dtype=np.uint32)
    else:
        bits = np.random.default_rng(seed).integers(0, 2**32, size=size, dtype=np.uint32)
    # 24 random bits per entry give exactly representable float32 values in [0, 1).
    return ((bits >> 8).astype(np.float32) / np.float32(2**24)).reshape(shape)


def generate_key(dim: int, seed=None) -> np.ndarray:
    """Draws a key uniform in [0, 1)^dim, as the paper does, from the CSPRNG (see `secret_uniform`)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise KeyFormatError(f"key dimension must be an integer, got {dim!r}")
    dim = int(dim)
    if dim < 1:
        raise KeyFormatError(f"key dimension must be positive, got {dim}")
    return secret_uniform((dim,), seed)


def validate_key(key, dim: int | None = None) -> np.ndarray:
    """Returns `key` as a float32 vector, or raises KeyFormatError with one clear line."""
    array = np.asarray(key)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise KeyFormatError(f"key must be a numeric vector, got dtype {array.dtype}")
    if array.ndim != 1:
        raise KeyFormatError(f"key must be a vector, got shape {array.shape}")
    if dim is not None and array.shape[0] != dim:
        raise KeyFormatError(f"key has length {array.shape[0]}, the lock expects {dim}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise KeyFormatError("key contains NaN or Inf")
    return array


def save_key(path: str, key, owner: str = "") -> None:
    """Writes `key` to `path` readable by its owner only (mode 0600), atomically; `owner` names whom the
    key belongs to (checksummed with it: `load_key` can refuse a key file of someone else)."""
    key = validate_key(key)
    owner_bytes = str(owner).encode()
    payload = _HEADER.pack(_MAGIC, key.shape[0], len(owner_bytes)) + owner_bytes + key.astype("<f4").tobytes()
    data = payload + hashlib.sha256(payload).digest()
    with atomic_write(path, mode=0o600) as f:
        f.write(data)


def load_key(path: str, dim: int | None = None, owner: str | None = None) -> np.ndarray:
    """Reads a key file written by `save_key`; a corrupt or mismatched file raises KeyFormatError.

    With `owner`, the file must name that owner (a format 1 file, which names none, is refused).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyFormatError(f"cannot read key file {path}: {e.strerror}") from None
    magic = data[: len(_MAGIC)]
    header = _HEADER if magic == _MAGIC else _HEADER_V1
    if len(data) < header.size + _DIGEST_SIZE:
        raise KeyFormatError(f"key file {path} is truncated")
    if magic not in (_MAGIC, _MAGIC_V1):
        raise KeyFormatError(f"{path} is not a tfkl key file")
    payload, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    length, owner_length = (header.unpack(payload[: header.size]) + (0,))[1:3]
    body = header.size + owner_length
    if hashlib.sha256(payload).digest() != digest or len(payload) != body + 4 * length:
        raise KeyFormatError(f"key file {path} is corrupt (checksum mismatch)")
    stored_owner = payload[header.size : body].decode(errors="replace") if magic == _MAGIC else None
    if owner is not None and stored_owner != owner:
        found = "no owner (a format 1 key file)" if stored_owner is None else f"owner {stored_owner!r}"
        raise KeyFormatError(f"key file {path} belongs to someone else ({found}, expected {owner!r}); refusing it")
    key = np.frombuffer(payload[body:], dtype="<f4").astype(np.float32)
    return validate_key(key, dim)
