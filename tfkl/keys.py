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
from tfkl.names import KEY_DISTRIBUTIONS

_MAGIC_V1 = b"TFKLKEY1"
_HEADER_V1 = struct.Struct("<8sI")
_MAGIC = b"TFKLKEY2"
_HEADER = struct.Struct("<8sIH")
_DIGEST_SIZE = hashlib.sha256().digest_size


class KeyFormatError(ValueError):
    """A key or key file that cannot be used (wrong shape, dtype, non-finite, corrupt)."""


def _random_bits(size, seed=None) -> np.ndarray:
    """`size` uint32 values from the operating system's CSPRNG (`os.urandom`), or from a seeded NumPy
    generator when `seed` is given (reproducible experiments only, never a real deployment)."""
    if seed is None:
        return np.frombuffer(os.urandom(4 * size), dtype=np.uint32)
    return np.random.default_rng(seed).integers(0, 2**32, size=size, dtype=np.uint32)


def _unit_interval(bits) -> np.ndarray:
    """float32 values in [0, 1) from uint32 bits: 24 random bits each, exactly representable."""
    return (bits >> 8).astype(np.float32) / np.float32(2**24)


def secret_uniform(shape, seed=None) -> np.ndarray:
    """float32 values uniform in [0, 1) of `shape`, from the operating system's CSPRNG (`os.urandom`);
    a seed is only for reproducible experiments and must never be used for a real deployment."""
    shape = tuple(int(d) for d in np.atleast_1d(shape))
    return _unit_interval(_random_bits(int(np.prod(shape)), seed)).reshape(shape)


def secret_gaussian(shape, seed=None) -> np.ndarray:
    """float32 values from N(0, 1) of `shape`, from the CSPRNG (Box-Muller on `os.urandom` bits);
    a seed as `secret_uniform`."""
    shape = tuple(int(d) for d in np.atleast_1d(shape))
    size = int(np.prod(shape))
    bits = _random_bits(2 * size, seed)
    radius = 1.0 - _unit_interval(bits[:size]).astype(np.float64)  # in (0, 1]: the logarithm stays finite
    angle = _unit_interval(bits[size:]).astype(np.float64)
    values = np.sqrt(-2.0 * np.log(radius)) * np.cos(2.0 * np.pi * angle)
    return values.astype(np.float32).reshape(shape)


def secret_rademacher(shape, seed=None) -> np.ndarray:
    """float32 values -1 or +1 with equal probability of `shape`, from the CSPRNG (the top bit of
    `os.urandom` words); a seed as `secret_uniform`."""
    shape = tuple(int(d) for d in np.atleast_1d(shape))
    bits = _random_bits(int(np.prod(shape)), seed)
    return (2.0 * (bits >> 31).astype(np.float32) - 1.0).reshape(shape)


_SAMPLERS = {"uniform": secret_uniform, "gaussian": secret_gaussian, "rademacher": secret_rademacher}
assert tuple(_SAMPLERS) == KEY_DISTRIBUTIONS


def generate_key(dim: int, seed=None, distribution: str = "uniform") -> np.ndarray:
    """Draws a key of length `dim` from the CSPRNG (see `secret_uniform`).

    `distribution`: 'uniform' in [0, 1) (the paper's), 'gaussian' (N(0, 1)) or 'rademacher'
    (+-1). Every uniform key is 0.5 plus a zero-mean part, so its projection through a lock
    layer, `key @ kernel`, shares the term `0.5 * sum(kernel rows)` with every other key: a lock
    trained on one key can answer any key alike. Zero-mean keys share no such term: two keys'
    projections are uncorrelated.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise KeyFormatError(f"key dimension must be an integer, got {dim!r}")
    dim = int(dim)
    if dim < 1:
        raise KeyFormatError(f"key dimension must be positive, got {dim}")
    if distribution not in _SAMPLERS:
        raise KeyFormatError(f"key distribution must be one of {KEY_DISTRIBUTIONS}, got {distribution!r}")
    return _SAMPLERS[distribution]((dim,), seed)


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


def key_file_owner(path: str) -> str | None:
    """The owner a key file names ('' for none; None for a format 1 file, or a file that is no key file)."""
    with open(path, "rb") as f:
        data = f.read(_HEADER.size + 65536)
    if data[: len(_MAGIC)] != _MAGIC or len(data) < _HEADER.size:
        return None
    owner_length = _HEADER.unpack(data[: _HEADER.size])[2]
    return data[_HEADER.size : _HEADER.size + owner_length].decode(errors="replace")


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
