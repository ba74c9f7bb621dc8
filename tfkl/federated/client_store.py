"""Per-client private state on disk, apart from the server's state.

Layout under `directory` (the run's root_dir/clients):
  <client_id>/key                   the client's key (tfkl.save_key: owner-only, checksummed, naming the
                                    run and the client it belongs to: another client's key is refused)
  <client_id>/state_RRRRR.npz       its lock weights, optimizer buffers, local statistics after round R
  manifest_RRRRR.json               written last for round R: every client's current state file and
                                    its SHA-256; a round's client states are complete iff it exists
Every file is written atomically (temporary file + rename) with owner-only permissions.
"""

import collections
import hashlib
import json
import os
import re
import zipfile

import numpy as np

from tfkl import keys as keys_lib
from tfkl.files import atomic_write

_FIELDS = ("lock", "optimizer", "statistics")
_MANIFEST = re.compile(r"^manifest_(\d{5})\.json$")


class ClientStateError(ValueError):
    """A client state file that is missing, corrupt or does not match the run."""


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_private(path, write):
    with atomic_write(path, mode=0o600) as f:
        write(f)


class ClientStore:
    """Saves and restores every client's private state, round by round."""

    def __init__(self, directory, run_id=None):
        """`run_id`: the run's id, bound into every key file with the client id (None: a run from
        before key files named their owner; its key files are read without that check)."""
        self.directory = directory
        self.run_id = run_id
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def key_owner(self, client_id):
        """The owner a client's key file names (None: not checked, see `__init__`)."""
        return None if self.run_id is None else f"run {self.run_id} client {client_id}"

    def _load_key(self, client_id, key_dim):
        path = os.path.join(self.directory, str(client_id), "key")
        try:
            return keys_lib.load_key(path, key_dim, owner=self.key_owner(client_id))
        except keys_lib.KeyFormatError as e:
            raise ClientStateError(str(e)) from None

    def _client_dir(self, client_id):
        path = os.path.join(self.directory, str(client_id))
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def manifest_path(self, round_num):
        return os.path.join(self.directory, f"manifest_{int(round_num):05d}.json")

    def rounds(self):
        """Rounds whose client states are complete, ascending."""
        return sorted(int(m.group(1)) for m in map(_MANIFEST.match, os.listdir(self.directory)) if m)

    def save(self, round_num, states, changed):
        """Writes the states of the `changed` client ids, then the round's manifest for all `states`.

        `states` maps client id -> state structure (key, lock, optimizer, statistics lists).
        """
        previous = self._read_manifest(self.rounds()[-1]) if self.rounds() else {}
        entries = {}
        for client_id, state in states.items():
            cid = str(client_id)
            if cid in previous and client_id not in changed:
                entries[cid] = previous[cid]
                continue
            client_dir = self._client_dir(cid)
            if state["key"]:
                saved = self.saved_key(cid)
                if saved is None:
                    keys_lib.save_key(os.path.join(client_dir, "key"), state["key"][0], self.key_owner(cid) or "")
                elif not np.array_equal(saved, state["key"][0]):
                    raise ClientStateError(f"client {cid}'s key differs from its key file; refusing to mix them")
            name = f"state_{int(round_num):05d}.npz"
            arrays = {f"{field}/{i:05d}": np.asarray(a) for field in _FIELDS for i, a in enumerate(state[field])}
            _write_private(os.path.join(client_dir, name), lambda f, arrays=arrays: np.savez(f, **arrays))
            entries[cid] = {
                "file": f"{cid}/{name}",
                "sha256": _sha256(os.path.join(client_dir, name)),
                "counts": {field: len(state[field]) for field in _FIELDS},
                "has_key": bool(state["key"]),
            }
        text = json.dumps({"round": int(round_num), "clients": entries}, indent=1, sort_keys=True).encode()
        _write_private(self.manifest_path(round_num), lambda f: f.write(text))

    def saved_key(self, client_id, key_dim=None):
        """The client's key file's key, or None if it has none yet."""
        if not os.path.exists(os.path.join(self.directory, str(client_id), "key")):
            return None
        return self._load_key(client_id, key_dim)

    def _read_manifest(self, round_num):
        path = self.manifest_path(round_num)
        try:
            with open(path) as f:
                return json.load(f)["clients"]
        except (OSError, ValueError, KeyError) as e:
            raise ClientStateError(f"client manifest {path} is unreadable: {e}") from None

    def load(self, round_num, key_dim=None):
        """All clients' states after `round_num`, checksums verified; raises ClientStateError."""
        states = {}
        for cid, entry in self._read_manifest(round_num).items():
            path = os.path.join(self.directory, entry["file"])
            if not os.path.exists(path):
                raise ClientStateError(f"client state file {path} is missing")
            if _sha256(path) != entry["sha256"]:
                raise ClientStateError(f"client state file {path} is corrupt (checksum mismatch)")
            try:
                with np.load(path, allow_pickle=False) as f:
                    state = collections.OrderedDict(key=[])
                    for field in _FIELDS:
                        state[field] = [f[f"{field}/{i:05d}"] for i in range(entry["counts"][field])]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise ClientStateError(f"client state file {path} is unreadable: {e}") from None
            if entry["has_key"]:
                state["key"] = [self._load_key(cid, key_dim)]
            states[cid] = collections.OrderedDict((k, state[k]) for k in ("key",) + _FIELDS)
        return states

    def last_update_rounds(self, round_num):
        """Client id -> the last round (<= round_num) its state changed (0: never took part)."""
        return {
            cid: int(entry["file"].rsplit("_", 1)[1].split(".")[0])
            for cid, entry in self._read_manifest(round_num).items()
        }

    def prune(self, keep_rounds):
        """Deletes manifests not in `keep_rounds` and state files no kept manifest refers to."""
        kept_files = set()
        for round_num in self.rounds():
            if round_num in keep_rounds:
                kept_files.update(e["file"] for e in self._read_manifest(round_num).values())
            else:
                os.remove(self.manifest_path(round_num))
        for cid in os.listdir(self.directory):
            client_dir = os.path.join(self.directory, cid)
            if not os.path.isdir(client_dir):
                continue
            for name in os.listdir(client_dir):
                if name.startswith("state_") and f"{cid}/{name}" not in kept_files:
                    os.remove(os.path.join(client_dir, name))
