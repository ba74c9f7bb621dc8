"""The run directory of a training program: its configuration file and the state of its rounds.

Under `root_dir`:
  config.json          the run's configuration and its random id (`run_id`, bound into every client's
                       key file); another run's root dir is refused
  server/              tff.program.FileProgramStateManager: server state per saved round
  clients/             tfkl.federated.client_store.ClientStore: private client states per round
  metrics.csv, tensorboard/   per-round metrics (CSV and TensorBoard release managers)
  captures/            optional: what a curious server received (tfkl.capture format)
  client_data/         each client's examples in a file (the round ships its path)
  manifests/           tfkl.federated.manifest: per complete round, the size and SHA-256 of each file the
                       run owns for it; a resumed run checks its round's files against it before any work
  lock                 the PID of the process that writes the run (`ownership`: an flock held while it
                       trains; empty when none does)
Client states are saved before the server state, then the round's manifest, so a round is complete when
the three exist (a round saved before runs had manifests: the first two); a resumed run starts from the last
complete round and gives the same result as an uninterrupted one. A client's
state is created on its first sampling and read only when it is sampled: the driver's memory does
not grow with --num_clients.
"""

import asyncio
import collections
import contextlib
import csv
import dataclasses
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tfkl import keys as keys_lib
from tfkl.federated.client_store import ClientStateError, ClientStore
from tfkl.federated.config import Config, ProgramError
from tfkl.federated.manifest import ManifestError, RunManifests
from tfkl.files import atomic_write

CONFIG_FILE = "config.json"
RUN_ID = "run_id"
LOCK_FILE = "lock"
METRICS_FILE = "metrics.csv"
_TFF_TEMP = re.compile(r"^(program_state_\d+|metrics\.csv)_temp\d{4}$")  # file_utils' temporary twins
_OWNED = {}  # (device, inode) of a lock file -> its descriptor, for the run dirs this process owns


def check_root_dir(root_dir):
    """Refuses a root dir that is a file, or that holds other files and no CONFIG_FILE (without writing)."""
    if os.path.exists(root_dir) and not os.path.isdir(root_dir):
        raise ProgramError(f"--root_dir {root_dir} is a file, not a directory; use a new --root_dir")
    if os.path.isdir(root_dir) and not os.path.exists(os.path.join(root_dir, CONFIG_FILE)):
        if set(os.listdir(root_dir)) - {LOCK_FILE}:
            raise ProgramError(f"{root_dir} is not empty and holds no {CONFIG_FILE}; use a new --root_dir")


@contextlib.contextmanager
def ownership(root_dir):
    """Makes this process the run's one writer while the context lasts: an exclusive flock on
    root_dir/lock (the OS drops it when the process dies, even by kill -9), which holds its PID. Another
    holder's run is refused (ProgramError naming its PID). Re-entrant within a process."""
    try:
        os.makedirs(root_dir, exist_ok=True)
    except OSError as e:
        raise ProgramError(f"cannot create --root_dir {root_dir}: {e.strerror}") from None
    path = os.path.join(root_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ProgramError(f"cannot write in --root_dir {root_dir}: {e.strerror}") from None
    identity = os.fstat(fd)[1:3]
    if identity in _OWNED:
        os.close(fd)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise ProgramError(
            f"{root_dir} is in use by process {holder} (it holds {path}); wait for it to end, or stop it "
            "and run the same command again"
        ) from None
    _OWNED[identity] = fd
    try:
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            raise ProgramError(f"cannot write in --root_dir {root_dir}: {e.strerror}") from None
        yield
    finally:
        del _OWNED[identity]
        os.ftruncate(fd, 0)
        os.close(fd)


def _holder_pid(fd):
    """The PID in a lock file another process holds (it writes it right after taking the lock)."""
    for _ in range(20):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "(unknown)"


def writer_pid(root_dir):
    """The PID of the process training the run in `root_dir` now, or None (none holds its lock)."""
    try:
        fd = os.open(os.path.join(root_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(fd)
    finally:
        os.close(fd)
    return None


def check_config(root_dir, config):
    """Writes config.json in a new (or empty) root dir; refuses one holding another run or other files,
    and a root dir this process cannot write."""
    path = os.path.join(root_dir, CONFIG_FILE)
    wanted = config.to_json()
    if os.path.exists(root_dir) and not os.path.isdir(root_dir):
        raise ProgramError(f"--root_dir {root_dir} is a file, not a directory; use a new --root_dir")
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            raise ProgramError(f"{path} is unreadable ({e}); not touching this root dir") from None
        if not isinstance(stored, dict):
            raise ProgramError(f"{path} is unreadable (not a JSON object); not touching this root dir")
        # A field added since the run started counts as its default there.
        stored = {**Config().to_json(), **stored}
        stored.pop(RUN_ID, None)
        differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if differing:
            k = differing[0]
            raise ProgramError(
                f"{root_dir} holds another run ({k}: {stored.get(k)!r} there, {wanted.get(k)!r} "
                f"here); use a new --root_dir"
            )
        _check_writable(root_dir)
        return
    if os.path.isdir(root_dir) and set(os.listdir(root_dir)) - {LOCK_FILE}:
        raise ProgramError(f"{root_dir} is not empty and holds no {CONFIG_FILE}; use a new --root_dir")
    try:
        os.makedirs(root_dir, exist_ok=True)
    except OSError as e:
        raise ProgramError(f"cannot create --root_dir {root_dir}: {e.strerror}") from None
    _check_writable(root_dir)
    with atomic_write(path, binary=False) as f:
        json.dump({**wanted, RUN_ID: secrets.token_hex(8)}, f, indent=1)


def check_writable(root_dir):
    """Refuses a run whose directories, or metrics.csv, this process cannot write (chattr +i, a read-only mount),
    before any work: a round would fail half-written."""
    clients = os.path.join(root_dir, "clients")
    names = [*_DIRECTORIES, *(f"clients/{c}" for c in (os.listdir(clients) if os.path.isdir(clients) else ()))]
    for path in (os.path.join(root_dir, name) for name in names):
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                tempfile.TemporaryFile(dir=path).close()
            except OSError as e:
                raise ProgramError(f"cannot write in {path}: {e.strerror}; {_MAKE_WRITABLE}") from None
    metrics = os.path.join(root_dir, METRICS_FILE)
    if os.path.isfile(metrics):
        try:
            os.close(os.open(metrics, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            raise ProgramError(f"cannot write {metrics}: {e.strerror}; {_MAKE_WRITABLE}") from None


_MAKE_WRITABLE = "make it writable (chattr -i, chmod u+w) and run the same command again"


def _check_writable(root_dir):
    try:
        tempfile.TemporaryFile(dir=root_dir).close()
    except OSError as e:
        raise ProgramError(f"cannot write in --root_dir {root_dir}: {e.strerror}") from None


def run_id(root_dir):
    """The run's random id from its config.json; None for a run from before runs had one."""
    try:
        with open(os.path.join(root_dir, CONFIG_FILE)) as f:
            return json.load(f).get(RUN_ID)
    except (OSError, ValueError, AttributeError):
        return None


def load_config(root_dir):
    path = os.path.join(root_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            stored = json.load(f)
        fields = {f.name for f in dataclasses.fields(Config)}
        return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ProgramError(f"{root_dir} is not a training run's root dir ({CONFIG_FILE}: {e})") from None


def repair_metrics(root_dir, last_round):
    """Rewrites a damaged metrics.csv (a truncated row or header, a row of no round, rounds out of order) with
    its sound rows up to `last_round`, the run's last complete round (the rows after it are released again);
    returns a line saying what was lost, or None when the file is sound (or missing)."""
    path = os.path.join(root_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or ()), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fields, rows = [], [str(e)]
    sound = 0  # the rows 1, 2, ... that are whole, in order
    while "round" in fields and sound < len(rows) and _sound_row(rows[sound], sound + 1):
        sound += 1
    if sound == len(rows) and sound >= last_round:
        return None
    kept = rows[: min(sound, last_round)]
    fields, rebuilt = _rebuilt_rows(root_dir, fields if kept else [], len(kept) + 1, last_round)
    with atomic_write(path, binary=False) as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept + rebuilt)
    done = len(kept) + len(rebuilt)
    return (
        f"warning: {path} was damaged (a row cut short, or rounds out of order): rewritten with "
        f"{f'the rows of rounds 1..{len(kept)}' if kept else 'no row'}"
        + (f", rounds {len(kept) + 1}..{done} rebuilt from tensorboard/ (float32)" if rebuilt else "")
        + ("" if done == last_round else f"; rounds {done + 1}..{last_round} have no metrics row")
    )


def _rebuilt_rows(root_dir, fields, first, last):
    """(fields, rows of rounds `first`..`last`) from the run's TensorBoard events (the same metrics, as float32),
    up to the first round they lack; `fields`: metrics.csv's header ([]: the events' tags)."""
    steps = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(root_dir, "tensorboard", "events.out.tfevents.*"))):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    steps[event.step][value.tag] = float(tf.make_ndarray(value.tensor))
        except (tf.errors.OpError, ValueError, TypeError):
            continue  # an events file cut short: the events read so far count
    if not fields:
        fields = ["round", *sorted({tag for step in steps.values() for tag in step})]
    rows = []
    for round_num in range(first, last + 1):
        if not set(fields[1:]) <= set(steps.get(round_num, {})):
            break
        rows.append({"round": round_num, **{k: _metric_text(steps[round_num][k]) for k in fields[1:]}})
    return fields, rows


def _metric_text(value):
    return str(int(value)) if value.is_integer() else str(np.float32(value))


def _sound_row(row, round_num):
    """Whether a metrics row has every field (no more: csv leaves None for the missing ones) and is `round_num`'s."""
    return None not in row and None not in row.values() and row["round"] == str(round_num)


def metrics_manager(root_dir):
    """The release manager of the per-round metrics: metrics.csv and TensorBoard."""
    return tff.program.GroupingReleaseManager(
        [
            tff.program.CSVFileReleaseManager(os.path.join(root_dir, METRICS_FILE), key_fieldname="round"),
            tff.program.TensorBoardReleaseManager(os.path.join(root_dir, "tensorboard")),
        ]
    )


def client_data_dir(root_dir):
    return os.path.join(os.path.abspath(root_dir), "client_data")


_DIRECTORIES = ("server", "clients", "captures", "client_data", "tensorboard", "manifests")


def _check_layout(root_dir):
    """Refuses a run whose directories (server/, clients/, ...) were replaced by files, or its files by
    directories."""
    for name in _DIRECTORIES:
        path = os.path.join(root_dir, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ProgramError(f"{path} is not a directory; restore the run's {name}/ from a backup")
    for name in (CONFIG_FILE, METRICS_FILE, LOCK_FILE):
        if os.path.isdir(os.path.join(root_dir, name)):
            raise ProgramError(f"{os.path.join(root_dir, name)} is a directory; a run's {name} is a file")


def _bound_run_id(root_dir):
    """The run's id; refuses a run whose config.json lost its id while its key files name one (a key
    copied from another client would pass unchecked)."""
    found = run_id(root_dir)
    clients = os.path.join(root_dir, "clients")
    if found is not None or not os.path.isdir(clients):
        return found
    for cid in os.listdir(clients):
        key = os.path.join(clients, cid, "key")
        if os.path.isfile(key) and keys_lib.key_file_owner(key):
            raise ProgramError(
                f"{root_dir}/{CONFIG_FILE} lacks its {RUN_ID}, but key file {key} names an owner: "
                f"refusing keys whose owner cannot be checked; restore {CONFIG_FILE} from a backup"
            )
    return None


class RunStateManager:
    """The program state of a run, by round: the server state (TFF's FileProgramStateManager) and
    every client's private state (ClientStore). `keep_rounds`: complete rounds kept besides round 0
    (None: every round)."""

    def __init__(self, root_dir, keep_rounds=None):
        self.root_dir = root_dir
        self.keep_rounds = keep_rounds
        self.server = tff.program.FileProgramStateManager(
            os.path.join(root_dir, "server"), keep_total=0 if keep_rounds is None else keep_rounds + 1, keep_first=True
        )
        _check_layout(root_dir)
        self.clients = ClientStore(os.path.join(root_dir, "clients"), _bound_run_id(root_dir))
        self.manifests = RunManifests(root_dir)

    def _server_rounds(self):
        return sorted(asyncio.run(self.server.get_versions()) or [])

    def complete_rounds(self):
        """The rounds whose server and client states are both on disk, and their manifest once the run has
        manifests (a round saved before it had any counts without one), in order."""
        rounds = sorted(set(self._server_rounds()) & set(self.clients.rounds()))
        sealed = self.manifests.rounds()
        return [r for r in rounds if not sealed or r in sealed or r < sealed[0]]

    def unsealed_rounds(self):
        """The rounds after the last complete one that have a server state: their manifest is missing (a save
        interrupted just before it, or deleted), so a resumed run trains them again (`drop_unsealed`)."""
        complete = self.complete_rounds()
        return [r for r in self._server_rounds() if r > (complete[-1] if complete else -1)]

    def drop_unsealed(self):
        """Deletes the server states of `unsealed_rounds`, which a resumed run saves again, and what TFF's
        managers leave of a write cut short (a full disk, kill -9): server/program_state_N_tempNNNN,
        metrics.csv_tempNNNN."""
        for round_num in self.unsealed_rounds():
            shutil.rmtree(os.path.join(self.root_dir, "server", f"program_state_{round_num}"))
        temporary = glob.glob(os.path.join(self.root_dir, "server", "program_state_*_temp*"))
        for path in temporary + glob.glob(os.path.join(self.root_dir, f"{METRICS_FILE}_temp*")):
            if _TFF_TEMP.match(os.path.basename(path)):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)

    def check_manifest(self, round_num):
        """Raises ProgramError naming the first file of `round_num` that does not match its manifest and what
        to do. Returns False when the round has no manifest (saved before runs had them), else True."""
        if round_num not in self.manifests.rounds():
            return False
        verified = {}
        try:
            self.manifests.check(round_num, self._client_files(round_num), verified)
        except ManifestError as e:
            raise ProgramError(self._mismatch(round_num, e, verified)) from None
        return True

    def restore_metrics(self, round_num):
        """Rewrites metrics.csv from `round_num`'s manifest when it does not match it (check_manifest has
        refused the run if the manifest holds no copy); returns a warning line saying so, or None."""
        if round_num not in self.manifests.rounds():
            return None
        problem = self.manifests.metrics_problem(round_num)
        if not problem:
            return None
        path, manifest = os.path.join(self.root_dir, METRICS_FILE), self.manifests.path(round_num)
        with atomic_write(path) as f:
            f.write(self.manifests.saved_metrics(round_num))
        return (
            f"warning: {path} did not match the manifest of round {round_num} ({problem}): rewritten from "
            f"{manifest}, as it was when round {round_num} was saved"
        )

    def _client_files(self, round_num):
        try:
            return self.clients.listed_files(round_num)
        except ClientStateError as e:
            raise ProgramError(str(e)) from None

    def _mismatch(self, round_num, error, verified):
        """The error line of a file that does not match `round_num`'s manifest."""
        path, manifest = os.path.join(self.root_dir, error.path), self.manifests.path(round_num)
        if path == manifest:
            return f"{path} is {error.problem}; restore it from a backup, or delete it: round {round_num} trains again"
        if error.path.startswith("client_data/"):
            advice = "delete it: train writes it again from the data set"
        else:
            advice = "restore it from a backup"
            earlier = self._intact_round(round_num, verified)
            if earlier is not None:
                later = ", ".join(f"program_state_{r}" for r in self._server_rounds() if r > earlier)
                advice += (
                    f", or resume from round {earlier} (its files are intact): delete {later} in {self.root_dir}/server"
                )
        return f"{path} does not match the manifest of round {round_num} ({manifest}): {error.problem}; {advice}"

    def _intact_round(self, round_num, verified):
        """The last complete round before `round_num` whose files match its manifest, or None."""
        sealed = self.manifests.rounds()
        for earlier in reversed([r for r in self.complete_rounds() if r < round_num and r in sealed]):
            try:
                self.manifests.check(earlier, self.clients.listed_files(earlier), verified)
                return earlier
            except (ManifestError, ClientStateError):
                continue
        return None

    def check_states(self):
        """Raises ProgramError when the server state names a round whose client states are gone (never
        regenerating a client's secret: without server states, a run starts again with its saved keys). Returns the
        rounds after the last complete one that have client states only (an interrupted save, or a
        deleted server state): a resumed run trains them again."""
        server, clients = self._server_rounds(), self.clients.rounds()
        clients_dir = os.path.join(self.root_dir, "clients")
        if server and server[-1] not in clients:
            missing = (
                f"{clients_dir}/ holds no client states"
                if not clients
                else f"the client states of round {server[-1]} ({self.clients.manifest_path(server[-1])}) are missing"
            )
            raise ProgramError(
                f"{missing}, but the server has trained to round {server[-1]}: the clients' keys and locks "
                f"cannot be regenerated; restore {clients_dir} from a backup or use a new --root_dir"
            )
        complete = self.complete_rounds()
        return [r for r in clients if complete and r > complete[-1]]

    def initial_key(self, config, client_id):
        """A new client's key; one already on disk (its creation was interrupted before its state was
        listed, or the run starts again without server states) is kept: a secret is never redrawn."""
        if not config.locked:
            return None
        try:
            saved = self.clients.saved_key(client_id, config.key_dim)
        except ClientStateError as e:
            raise ProgramError(str(e)) from None
        return config.client_key(client_id) if saved is None else saved

    def initial_state_fn(self, config, process):
        """client id -> a new client's initial state: its key (`initial_key`) and its lock weights
        (config.client_lock_fn, set up when the first client is created)."""
        client_lock = None

        def create(client_id):
            nonlocal client_lock
            if client_lock is None:
                client_lock = config.client_lock_fn()  # lock_init='private' builds a model for it
            return process.initial_client_state(self.initial_key(config, client_id), client_lock(client_id))

        return create

    def save(self, round_num, server_state, client_states, changed):
        """Saves a round: the `changed` clients' states (the others in `client_states` that the last
        round does not list yet as well), then the server state, then the round's manifest; prunes old rounds."""
        self.clients.save(round_num, client_states, changed=changed)
        asyncio.run(self.server.save(server_state, round_num))
        self.manifests.write(round_num, self.clients.listed_files(round_num))
        if self.keep_rounds is not None:
            rounds = self.clients.rounds()
            kept = set(rounds[-self.keep_rounds :]) | {0}  # the rounds the server manager keeps
            self.clients.prune(kept)
            self.manifests.prune(kept)

    def load(self, config, process, round_num=None, client_ids=None):
        """(server_state, client_states, round) of the last complete round (or `round_num`); None if none.

        `client_ids`: the clients whose states to load (None: every client the round lists; an id it
        does not list, a client that did not exist yet, has no entry).
        """
        root_dir = self.root_dir
        template = process.initialize()
        if round_num is None:
            rounds = self.complete_rounds()
            if not rounds:
                return None
            round_num = rounds[-1]
        try:
            loaded = asyncio.run(self.server.load(int(round_num), template))
            server_state = tf.nest.pack_sequence_as(template, _flat(loaded))
        except tff.program.ProgramStateNotFoundError:
            raise ProgramError(f"no server state for round {round_num} in {root_dir}/server") from None
        except Exception as e:  # a corrupt SavedModel raises many kinds of errors
            raise ProgramError(
                f"server state of round {round_num} in {root_dir}/server is unreadable: {type(e).__name__}"
            ) from None
        if [np.shape(x) for x in _flat(server_state)] != [np.shape(x) for x in _flat(template)]:
            raise ProgramError(f"server state of round {round_num} does not fit the model in {CONFIG_FILE}")
        try:
            stored = self.clients.client_ids(round_num)
            client_states = self.clients.load(round_num, _key_dim(config), client_ids)
        except ClientStateError as e:
            raise ProgramError(str(e)) from None
        valid = {str(i) for i in range(config.num_clients)}
        if not set(stored) <= valid:
            raise ProgramError(f"client states of round {round_num} do not match --num_clients={config.num_clients}")
        return server_state, self._checked(process, client_states, round_num), int(round_num)

    def load_clients(self, config, process, round_num, client_ids):
        """The states after `round_num` of those of `client_ids` that exist then; ProgramError if one is
        missing, corrupt or does not fit the process."""
        try:
            states = self.clients.load(round_num, _key_dim(config), client_ids)
        except ClientStateError as e:
            raise ProgramError(str(e)) from None
        return self._checked(process, states, round_num)

    def client_states(self, config, process, round_num, client_ids, create=None):
        """The states after `round_num` of `client_ids` (a round's sampled clients); a client is created
        on its first sampling by `create` (default: `initial_state_fn`) and kept on disk from then on.
        Only these clients' files are read. Returns (states by client id, the ids created now)."""
        create = create or self.initial_state_fn(config, process)
        try:
            states, created = self.clients.load_or_create(round_num, client_ids, create, _key_dim(config))
        except ClientStateError as e:
            raise ProgramError(str(e)) from None
        return self._checked(process, states, round_num), created

    def check_clients(self, config, process, round_num, client_ids):
        """Raises ProgramError if a client file `round_num` lists is missing, or if the state of one of
        `client_ids` (the next round's) is corrupt or does not fit: a resumed run stops before it
        writes anything. The other clients' states are verified when they are sampled."""
        try:
            self.clients.check_files(round_num)
        except ClientStateError as e:
            raise ProgramError(str(e)) from None
        self.load_clients(config, process, round_num, client_ids)

    @staticmethod
    def _checked(process, client_states, round_num):
        """`client_states` as numpy structures; ProgramError if one does not fit the process."""
        template_client = process.client_state_type
        for cid, state in client_states.items():
            client_states[cid] = collections.OrderedDict(
                (k, [np.asarray(a) for a in state[k]]) for k in ("key", "lock", "optimizer", "statistics")
            )
            if [len(v) for v in client_states[cid].values()] != [len(template_client[k]) for k in client_states[cid]]:
                raise ProgramError(f"client {cid}'s state of round {round_num} does not fit the run's options")
            for k, arrays in client_states[cid].items():
                for i, (array, spec) in enumerate(zip(arrays, template_client[k])):
                    if array.shape != tuple(spec.shape) or array.dtype != spec.dtype:
                        raise ProgramError(
                            f"client {cid}'s state of round {round_num} does not fit the model: {k}[{i}] is "
                            f"{array.dtype}{list(array.shape)}, the model needs {spec.dtype}{list(spec.shape)}"
                        )
        return client_states


def _key_dim(config):
    return config.key_dim if config.locked else None


def _flat(structure):
    return [np.asarray(x) for x in tf.nest.flatten(structure)]


def complete_rounds(root_dir):
    """The complete rounds of the run in `root_dir`, in order."""
    return RunStateManager(root_dir).complete_rounds()


def restore(root_dir, config, process, round_num=None, client_ids=None):
    """(server_state, client_states, round) of the run in `root_dir`: see `RunStateManager.load`."""
    return RunStateManager(root_dir).load(config, process, round_num, client_ids)
