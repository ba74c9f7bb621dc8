"""Secret keys: CSPRNG generation, validation, and owner-only key files with a checksum."""

import hashlib
import os
import struct

import numpy as np

from tfkl.files import atomic_write

_MAGIC = b"TFKLKEY1"
_HEADER = struct.Struct("<8sI")
_DIGEST_SIZE = hashlib.sha256().digest_size


class KeyFormatError(ValueError):
    """A key or key file that cannot be used (wrong shape, dtype, non-finite, corrupt)."""


def secret_uniform(shape, seed=None):
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


def generate_key(dim, seed=None):
    """Draws a key uniform in [0, 1)^dim, as the paper does, from the CSPRNG (see `secret_uniform`)."""
    dim = int(dim)
    if dim < 1:
        raise KeyFormatError(f"key dimension must be positive, got {dim}")
    return secret_uniform((dim,), seed)


def validate_key(key, dim=None):
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


def save_key(path, key):
    """Writes `key` to `path` readable by its owner only (mode 0600), atomically."""
    key = validate_key(key)
    payload = _HEADER.pack(_MAGIC, key.shape[0]) + key.astype("<f4").tobytes()
    data = payload + hashlib.sha256(payload).digest()
    with atomic_write(path, mode=0o600) as f:
        f.write(data)


def load_key(path, dim=None):
    """Reads a key file written by `save_key`; a corrupt or mismatched file raises KeyFormatError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyFormatError(f"cannot read key file {path}: {e.strerror}") from None
    if len(data) < _HEADER.size + _DIGEST_SIZE:
        raise KeyFormatError(f"key file {path} is truncated")
    payload, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    magic, length = _HEADER.unpack(payload[: _HEADER.size])
    if magic != _MAGIC:
        raise KeyFormatError(f"{path} is not a tfkl key file")
    if hashlib.sha256(payload).digest() != digest or len(payload) != _HEADER.size + 4 * length:
        raise KeyFormatError(f"key file {path} is corrupt (checksum mismatch)")
    key = np.frombuffer(payload[_HEADER.size :], dtype="<f4").astype(np.float32)
    return validate_key(key, dim)
