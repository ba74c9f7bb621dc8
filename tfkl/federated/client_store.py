"""Per-client private state on disk, apart from the server's state.

Layout under `directory` (the run's root_dir/clients):
  <client_id>/key                   the client's key (tfkl.save_key: owner-only, checksummed, naming the
                                    run and the client it belongs to: another client's key is refused)
  <client_id>/state_RRRRR.npz       its lock weights, optimizer buffers, local statistics after round R
                                    (state_00000.npz: its initial state)
  manifest_RRRRR.json               written last for round R: every client's current state file and
                                    its SHA-256; a round's client states are complete iff it exists.
                                    Format 2: {"format": 2, "round": R, "clients": {id: "V SHA256 L O
                                    S K"}}: the client's state file is state_V, with L lock, O optimizer
                                    and S statistics arrays, and a key file if K is 1 (format 1, read
                                    too: an object per client)
Every file is written atomically (temporary file + rename) with owner-only permissions.

A client has files once it exists: a driver may create every client up front (`save`) or each one
on its first sampling (`load_or_create`, which lists a new client's initial state in manifest 0 and
in the manifest it is loaded from), and reads only the clients it needs (`load(...,
client_ids=...)`), so that the driver's memory does not grow with the population.
"""

import collections
import contextlib
import hashlib
import json
import os
import re
import zipfile

import numpy as np

from tfkl import keys as keys_lib
from tfkl.files import atomic_write

_FIELDS = ("lock", "optimizer", "statistics")
_FORMAT = 2
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
        """Writes the states of the `changed` client ids, then the round's manifest.

        `states` maps client id -> state structure (key, lock, optimizer, statistics lists). The
        manifest lists every client of the previous round's (the last manifest before `round_num`),
        with a new file for each `changed` one, and the clients of `states` it did not list.
        """
        previous = self._read_manifest(self._previous_round(round_num))
        entries = dict(previous)
        changed = {str(c) for c in changed}
        for client_id, state in states.items():
            cid = str(client_id)
            if cid in previous and cid not in changed:
                continue
            entries[cid] = self._write_state(cid, round_num, state)
        self._write_manifest(round_num, entries)

    def load_or_create(self, round_num, client_ids, create, key_dim=None):
        """The states after `round_num` of `client_ids`, creating the clients that do not exist yet.

        `create(client_id)` gives a new client's initial state; it is written (key file and
        state_00000.npz) and listed in manifest 0, then in manifest `round_num`, before it is returned
        (as `create` gave it, not read back), so that a round interrupted and run again, or a run
        resumed from `round_num`, finds the same state. A client manifest 0 lists but `round_num`'s
        does not (an addition interrupted between the two) keeps the initial state listed there.
        Both manifests must exist. Returns (states by client id, the ids created now).
        """
        ids = [str(c) for c in client_ids]
        entries = self._read_manifest(round_num)
        initial = self._read_manifest(0) if int(round_num) else entries
        missing = [c for c in ids if c not in entries]
        created = [c for c in missing if c not in initial]
        new = {c: create(c) for c in created}
        if missing:
            added = {c: self._write_state(c, 0, state) for c, state in new.items()}
            if added:
                initial = {**initial, **added}
                self._write_manifest(0, initial)
            if int(round_num):
                entries = {**entries, **{c: initial[c] for c in missing}}
                self._write_manifest(round_num, entries)
            else:
                entries = initial
        return {c: new[c] if c in new else self._load_state(c, entries[c], key_dim) for c in ids}, created

    def _write_state(self, cid, round_num, state):
        """Writes one client's state file (and its key file if it has none yet); returns its manifest entry."""
        client_dir = self._client_dir(cid)
        if state["key"]:
            saved = self.saved_key(cid)
            if saved is None:
                keys_lib.save_key(os.path.join(client_dir, "key"), state["key"][0], self.key_owner(cid) or "")
            elif not np.array_equal(saved, state["key"][0]):
                raise ClientStateError(f"client {cid}'s key differs from its key file; refusing to mix them")
        name = f"state_{int(round_num):05d}.npz"
        arrays = {f"{field}/{i:05d}": np.asarray(a) for field in _FIELDS for i, a in enumerate(state[field])}
        _write_private(os.path.join(client_dir, name), lambda f: np.savez(f, **arrays))
        return _entry(
            round_num, _sha256(os.path.join(client_dir, name)), [len(state[f]) for f in _FIELDS], state["key"]
        )

    def _write_manifest(self, round_num, entries):
        # A string per client, no indentation: the manifest is read and written every round. With 10,000
        # clients format 1's indented objects took 80-330 ms to write and 9-14 ms to read (format 2: 2
        # and 1 ms), and set off the garbage collector's full passes (0.2 s each in a driver with
        # TensorFlow loaded) every few rounds: strings are not tracked by it.
        text = json.dumps({"format": _FORMAT, "round": int(round_num), "clients": entries}, separators=(",", ":"))
        _write_private(self.manifest_path(round_num), lambda f: f.write(text.encode()))

    def _previous_round(self, round_num):
        """The last round before `round_num` with a manifest (None: none)."""
        earlier = [r for r in self.rounds() if r < int(round_num)]
        return earlier[-1] if earlier else None

    def saved_key(self, client_id, key_dim=None):
        """The client's key file's key, or None if it has none yet."""
        if not os.path.exists(os.path.join(self.directory, str(client_id), "key")):
            return None
        return self._load_key(client_id, key_dim)

    def _read_manifest(self, round_num):
        """Client id -> manifest entry of `round_num` ({} for None), in format 2."""
        if round_num is None:
            return {}
        path = self.manifest_path(round_num)
        try:
            with open(path) as f:
                manifest = json.load(f)
            entries = manifest["clients"]
            if manifest.get("format", 1) not in (1, _FORMAT):
                raise ValueError(f"format {manifest['format']} is newer than this tfkl's ({_FORMAT})")
            if manifest.get("format", 1) == 1:
                entries = {cid: _from_format_1(entry) for cid, entry in entries.items()}
            elif not all(isinstance(entry, str) for entry in entries.values()):
                raise ValueError("a client's entry is not a string")
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ClientStateError(f"client manifest {path} is unreadable: {e}") from None
        return entries

    def files(self, round_num):
        """The state files `round_num`'s manifest lists, as 'client_id/state_RRRRR.npz'."""
        return {_file(cid, entry) for cid, entry in self._read_manifest(round_num).items()}

    def listed_files(self, round_num):
        """The files `round_num`'s manifest lists, as 'client_id/name' -> SHA-256 (None for a key file: its
        checksum is inside it)."""
        listed = {}
        for cid, entry in self._read_manifest(round_num).items():
            listed[_file(cid, entry)] = _fields(entry)[1]
            if _fields(entry)[3]:
                listed[f"{cid}/key"] = None
        return listed

    def client_ids(self, round_num):
        """The ids of the clients listed in `round_num`'s manifest (those that existed after it)."""
        return list(self._read_manifest(round_num))

    def check_files(self, round_num):
        """Raises ClientStateError if a state file or key file that `round_num`'s manifest lists is
        missing (without reading them: a state's checksum is verified when it is loaded)."""
        for cid, entry in self._read_manifest(round_num).items():
            path = os.path.join(self.directory, _file(cid, entry))
            if not os.path.exists(path):
                raise ClientStateError(f"client state file {path} is missing")
            key_path = os.path.join(self.directory, cid, "key")
            if _fields(entry)[3] and not os.path.exists(key_path):
                raise ClientStateError(f"key file {key_path} of client {cid} is missing")

    def load(self, round_num, key_dim=None, client_ids=None):
        """The states after `round_num` of `client_ids` (None: every listed client; an id not listed
        has no entry in the result), checksums verified; raises ClientStateError."""
        manifest = self._read_manifest(round_num)
        wanted = manifest if client_ids is None else [str(c) for c in client_ids if str(c) in manifest]
        return {cid: self._load_state(cid, manifest[cid], key_dim) for cid in wanted}

    def _load_state(self, cid, entry, key_dim):
        """One client's state from its manifest entry."""
        _, sha256, counts, has_key = _fields(entry)
        path = os.path.join(self.directory, _file(cid, entry))
        if not os.path.exists(path):
            raise ClientStateError(f"client state file {path} is missing")
        if _sha256(path) != sha256:
            raise ClientStateError(f"client state file {path} is corrupt (checksum mismatch)")
        try:
            with np.load(path, allow_pickle=False) as f:
                state = collections.OrderedDict(key=[])
                for field, count in zip(_FIELDS, counts):
                    state[field] = [f[f"{field}/{i:05d}"] for i in range(count)]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ClientStateError(f"client state file {path} is unreadable: {e}") from None
        if has_key:
            state["key"] = [self._load_key(cid, key_dim)]
        return collections.OrderedDict((k, state[k]) for k in ("key",) + _FIELDS)

    def last_update_rounds(self, round_num):
        """Client id -> the last round (<= round_num) its state changed (0: never took part)."""
        return {cid: _fields(entry)[0] for cid, entry in self._read_manifest(round_num).items()}

    def prune(self, keep_rounds):
        """Deletes manifests not in `keep_rounds` and the state files they list that no kept manifest does
        (never a file no manifest lists: a stray one of an interrupted save is written again when its
        round trains again).

        A manifest lists the previous one's files but for the clients that changed, so a file of a
        dropped manifest that a kept one lists is in the kept one just before or after it: only
        those manifests and manifest 0 are read, not every client's directory.
        """
        rounds = self.rounds()
        kept = sorted(set(rounds) & {int(r) for r in keep_rounds})
        dropped = [r for r in rounds if r not in kept]
        candidates = set()
        for round_num in dropped:
            candidates.update(self.files(round_num))
        referenced = set()
        for neighbour in {0} | {k for d in dropped for k in _neighbours(kept, d)}:
            if neighbour in kept:
                referenced.update(self.files(neighbour))
        for name in candidates - referenced:  # before the manifests: an interrupted prune leaves no file unlisted
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, name))
        for round_num in dropped:
            os.remove(self.manifest_path(round_num))


def _neighbours(kept, round_num):
    """The kept rounds just before and just after `round_num` (those there are)."""
    before = [k for k in kept if k < round_num]
    after = [k for k in kept if k > round_num]
    return ([before[-1]] if before else []) + ([after[0]] if after else [])


def _entry(round_num, sha256, counts, has_key):
    """A format 2 manifest entry."""
    return " ".join(map(str, (int(round_num), sha256, *counts, int(bool(has_key)))))


def _fields(entry):
    """(round of the state file, its SHA-256, its array counts by field, whether there is a key file)."""
    round_num, sha256, *counts, has_key = entry.split(" ")
    if len(counts) != len(_FIELDS):
        raise ClientStateError(f"manifest entry {entry!r} is malformed")
    return int(round_num), sha256, [int(c) for c in counts], has_key == "1"


def _file(cid, entry):
    return f"{cid}/state_{int(entry.split(' ', 1)[0]):05d}.npz"


def _from_format_1(entry):
    """A format 1 entry ({"file", "sha256", "counts", "has_key"}) in format 2."""
    round_num = int(entry["file"].rsplit("_", 1)[1].split(".")[0])
    return _entry(round_num, entry["sha256"], [entry["counts"][field] for field in _FIELDS], entry["has_key"])
