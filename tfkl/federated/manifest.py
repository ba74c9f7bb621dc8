"""The run's manifests: per complete round, the files the run owns for it, with their sizes and SHA-256.

root_dir/manifests/manifest_RRRRR.json, written (atomically, owner-only) once round R is saved:
{"format": 1, "round": R, "files": {path under root_dir: "SIZE SHA256"}} for config.json, the server
state of round R, every client's state file and key file (a key's hash, never its content), the client
data caches and metrics.csv as of round R (a resumed run may have released the next round's row since:
its first SIZE bytes are checked), and that metrics.csv's text ("metrics", rounds 1..R): a metrics.csv that does
not match is rewritten from it. A resumed run checks the files of its round before any work.

A manifest is built from the last one this process wrote or checked: only the files the round wrote
or changed are hashed (a client's state file not even then: its store hashed it when writing it).
"""

import hashlib
import json
import os
import re

from tfkl.files import atomic_write

DIRECTORY = "manifests"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
SERVER_PREFIX = "server/program_state_"
CLIENT_DATA = "client_data"
_FORMAT = 1
_MANIFEST = re.compile(r"^manifest_(\d{5})\.json$")
_CACHE_FILE = re.compile(r"^client_\d+\.tfrecord$")
_STATE = re.compile(r"^clients/\d+/state_\d{5}\.npz$")


class ManifestError(ValueError):
    """A manifest that is unreadable, or a file that does not match its manifest: `path` (under the
    root dir) and `problem`."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _sha256(path, size=None):
    """The SHA-256 of the file at `path` (of its first `size` bytes if given), read in chunks."""
    digest = hashlib.sha256()
    left = float("inf") if size is None else size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(int(min(left, 1 << 20)))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class RunManifests:
    """Writes and checks the manifests of the run in `root_dir`."""

    def __init__(self, root_dir):
        self.root_dir = root_dir
        self.directory = os.path.join(root_dir, DIRECTORY)
        self._last = None  # (round, entries) of the last manifest this process wrote or checked

    def path(self, round_num):
        return os.path.join(self.directory, f"manifest_{int(round_num):05d}.json")

    def rounds(self):
        """The rounds that have a manifest, ascending."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(m.group(1)) for m in map(_MANIFEST.match, os.listdir(self.directory)) if m)

    def read(self, round_num):
        """Path under the root dir -> "SIZE SHA256" of `round_num`'s manifest; ManifestError if unreadable."""
        return self._read(round_num)[0]

    def _read(self, round_num):
        """(entries as `read` returns them, metrics.csv's text as of the round or None); ManifestError if
        unreadable."""
        path = self.path(round_num)
        try:
            with open(path) as f:
                manifest = json.load(f)
            if manifest.get("format") != _FORMAT or manifest.get("round") != int(round_num):
                raise ValueError(f"not a format {_FORMAT} manifest of round {int(round_num)}")
            entries, metrics = manifest["files"], manifest.get("metrics")
            for entry in entries.values():
                size, sha256 = entry.split(" ")
                int(size), bytes.fromhex(sha256)
            if metrics is not None and not isinstance(metrics, str):
                raise ValueError("its metrics are not a text")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(os.path.relpath(path, self.root_dir), f"unreadable ({e})") from None
        return entries, metrics

    def saved_metrics(self, round_num):
        """metrics.csv's bytes when `round_num` was saved, if its manifest holds them and they match its
        entry; else None (a manifest written before manifests held them: metrics.csv cannot be rewritten)."""
        entries, metrics = self._read(round_num)
        if metrics is None or METRICS_FILE not in entries:
            return None
        data = metrics.encode(errors="surrogateescape")
        size, sha256 = entries[METRICS_FILE].split(" ")
        return data if len(data) == int(size) and hashlib.sha256(data).hexdigest() == sha256 else None

    def metrics_problem(self, round_num):
        """What is wrong with metrics.csv against `round_num`'s manifest, or None."""
        entry = self.read(round_num).get(METRICS_FILE)
        return entry and self._problem(METRICS_FILE, entry)

    def write(self, round_num, client_files):
        """Writes `round_num`'s manifest (its server state saved). `client_files`: the client store's files
        of the round, path under clients/ -> SHA-256 (None: not known, a key file)."""
        previous = self._last[1] if self._last and self._last[0] < int(round_num) else {}
        entries = {CONFIG_FILE: previous.get(CONFIG_FILE) or self._entry(CONFIG_FILE)}
        server = f"{SERVER_PREFIX}{int(round_num)}"
        for parent, _, names in os.walk(os.path.join(self.root_dir, server)):
            for rel in (os.path.relpath(os.path.join(parent, name), self.root_dir) for name in names):
                entries[rel] = self._entry(rel)
        for name, sha256 in client_files.items():
            rel = f"clients/{name}"
            known = previous.get(rel)
            if known and (sha256 is None or known.endswith(f" {sha256}")):
                entries[rel] = known
            elif sha256 is None:
                entries[rel] = self._entry(rel)
            else:
                entries[rel] = f"{os.path.getsize(os.path.join(self.root_dir, rel))} {sha256}"
        cache_dir = os.path.join(self.root_dir, CLIENT_DATA)
        for name in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else ():
            rel = f"{CLIENT_DATA}/{name}"
            if _CACHE_FILE.match(name):
                entries[rel] = previous.get(rel) or self._entry(rel)
        manifest = {"format": _FORMAT, "round": int(round_num), "files": entries}
        if os.path.isfile(os.path.join(self.root_dir, METRICS_FILE)):
            with open(os.path.join(self.root_dir, METRICS_FILE), "rb") as f:
                metrics = f.read()
            entries[METRICS_FILE] = f"{len(metrics)} {hashlib.sha256(metrics).hexdigest()}"
            manifest["metrics"] = metrics.decode(errors="surrogateescape")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        text = json.dumps(manifest, separators=(",", ":"))
        with atomic_write(self.path(round_num), mode=0o600) as f:
            f.write(text.encode())
        self._last = (int(round_num), entries)

    def _entry(self, rel):
        path = os.path.join(self.root_dir, rel)
        return f"{os.path.getsize(path)} {_sha256(path)}"

    def check(self, round_num, client_files, verified=None):
        """Raises ManifestError for the first file of `round_num`'s manifest that is missing or differs (a
        missing client data cache is written again from the data set, metrics.csv from the manifest's copy:
        not errors), or for a client the client store's manifest of the round (`client_files`, as for `write`)
        gives another state file. `verified`: a dict of the (path, entry) pairs found sound, shared between
        calls."""
        entries = self.read(round_num)
        verified = {} if verified is None else verified
        restorable = self.saved_metrics(round_num) is not None
        for rel, entry in sorted(entries.items()):
            if rel == METRICS_FILE and restorable:
                continue
            if (rel, entry) not in verified:
                verified[rel, entry] = self._problem(rel, entry)
            if verified[rel, entry]:
                raise ManifestError(rel, verified[rel, entry])
        states = {rel.split("/")[1]: (rel, entry.split(" ")[1]) for rel, entry in entries.items() if _STATE.match(rel)}
        for name, sha256 in client_files.items():
            cid = name.split("/")[0]
            if sha256 is not None and cid in states and states[cid] != (f"clients/{name}", sha256):
                raise ManifestError(
                    os.path.relpath(self._client_manifest(round_num), self.root_dir),
                    f"it gives client {cid} another state file than the run's manifest of round {int(round_num)}",
                )
        self._last = (int(round_num), entries)

    def _client_manifest(self, round_num):
        return os.path.join(self.root_dir, "clients", f"manifest_{int(round_num):05d}.json")

    def _problem(self, rel, entry):
        """What is wrong with the file at `rel` against its manifest `entry`, or None."""
        size, sha256 = entry.split(" ")
        path = os.path.join(self.root_dir, rel)
        if not os.path.isfile(path):
            return None if rel.startswith(f"{CLIENT_DATA}/") and not os.path.lexists(path) else "missing"
        actual = os.path.getsize(path)
        if actual < int(size):
            return f"truncated: {actual} bytes, {size} when the round was saved"
        if actual > int(size) and rel != METRICS_FILE:
            return f"changed: {actual} bytes, {size} when the round was saved"
        if _sha256(path, int(size)) != sha256:
            return "changed: its SHA-256 differs from the one when the round was saved"
        return None

    def prune(self, keep_rounds):
        """Deletes the manifests of the rounds not in `keep_rounds`."""
        for round_num in self.rounds():
            if round_num not in keep_rounds:
                os.remove(self.path(round_num))
