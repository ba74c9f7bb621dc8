"""The configuration of a federated training run, every rule on it checked once, and its process.

`Config` holds what defines a run (what must match to resume it); building one checks every rule
on its fields (`ConfigError`, one line). The flag layer (tff_programs/train.py) only parses.
"""

import dataclasses
import functools
import math

import tensorflow_federated as tff

from tfkl import keys as keys_lib
from tfkl import models, names, optimizers, private
from tfkl.federated import algorithms


class ProgramError(RuntimeError):
    """A run that cannot start or resume (bad configuration, root dir or state); one-line message."""


class ConfigError(ProgramError, ValueError):
    """A configuration that breaks one of `Config`'s rules."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a training run (the parts that must match to resume it)."""

    algorithm: str = "fedkl"
    model: str = "lenet"
    dataset: str = "digits"
    data_dir: str = None
    input_shape: tuple = (32, 32, 1)
    num_classes: int = 10
    num_clients: int = 3
    clients_per_round: int = None  # None: every client takes part in every round
    local_epochs: int = 1
    batch_size: int = 64
    examples_per_client: int = None  # None: each client trains on its whole partition; N: on at most N of it
    fresh_examples: bool = False  # with examples_per_client: a new subset of the partition each round
    split: str = "iid"
    alpha: float = 0.5
    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: tuple = (60, 120, 160)
    lr_gamma: float = 0.2
    server_learning_rate: float = 1.0
    persist_optimizer_state: bool = True
    statistics: str = "average"
    client_weighting: str = "num_examples"
    key_dim: int = 1024
    key_distribution: str = "uniform"  # FedKL: the clients' keys (tfkl.generate_key); the evaluation's random keys too
    random_key_penalty: float = 0.0  # FedKL: weight of the term pushing predictions under fresh random keys to uniform
    normalization: str = "batch"
    init: str = "pytorch"
    seed: int = 0
    seeded_keys: bool = False
    lock_where: str = "first"  # FedKL: the layers to lock ('first', 'first-two', 'all'; see tfkl.secure)
    lock_affine: str = "channel"  # FedKL: a gamma/beta per channel (the paper's) or per position and channel
    lock_kernel: str = "full"  # FedKL: the lock kernels as variables or compact (tfkl.KeyLock's kernel)
    lock_noise: float = 0.0  # FedKL: strength of the secret per-round noise on the lock (tfkl.KeyLock's round_noise)
    lock_init: str = "shared"  # FedKL: clients start from model_fn's lock weights (the paper) or
    # 'private' ones each draws from the CSPRNG (the server cannot know them)
    dp_clip: float = None  # DP-FedAvg (TFF's gaussian_fixed): clip of each client's update
    dp_noise_multiplier: float = 0.0  # ... and the noise stddev on the sum, in units of dp_clip
    prune_fraction: float = None  # each client zeroes this fraction of its smallest update entries

    def __post_init__(self):
        if self.clients_per_round is None:
            object.__setattr__(self, "clients_per_round", self.num_clients)
        for name, choices in (
            ("algorithm", names.ALGORITHMS),
            ("model", names.MODELS),
            ("dataset", names.DATASETS),
            ("split", names.SPLITS),
            ("statistics", names.STATISTICS),
            ("client_weighting", names.CLIENT_WEIGHTINGS),
            ("normalization", names.NORMALIZATIONS),
            ("init", names.INITS),
            ("key_distribution", names.KEY_DISTRIBUTIONS),
            ("lock_where", names.LOCK_WHERES),
            ("lock_init", names.LOCK_INITS),
            ("lock_affine", names.LOCK_AFFINES),
            ("lock_kernel", names.LOCK_KERNELS),
        ):
            _check(getattr(self, name) in choices, f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            _check(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")
        for name in ("num_clients", "clients_per_round", "local_epochs", "batch_size", "key_dim"):
            _check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _check(
            self.examples_per_client is None or self.examples_per_client >= 1,
            f"examples_per_client must be at least 1, got {self.examples_per_client}",
        )
        _check(
            not self.fresh_examples or self.examples_per_client is not None,
            "fresh_examples needs examples_per_client (the size of each round's subset)",
        )
        for name in ("alpha", "learning_rate", "lr_gamma", "server_learning_rate"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "dp_noise_multiplier", "random_key_penalty", "lock_noise"):
            _check(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        _check(
            self.clients_per_round <= self.num_clients,
            f"clients_per_round cannot exceed num_clients ({self.clients_per_round} > {self.num_clients})",
        )
        _check(not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0")
        _check(
            self.random_key_penalty == 0 or self.locked,
            f"random_key_penalty needs algorithm=fedkl (a model with a key), got algorithm={self.algorithm!r}",
        )
        _check(
            self.lock_kernel == "full" or self.locked,
            f"lock_kernel={self.lock_kernel!r} needs algorithm=fedkl (a model with a lock), got {self.algorithm!r}",
        )
        _check(
            self.lock_noise == 0 or self.locked,
            f"lock_noise needs algorithm=fedkl (a model with a lock), got {self.algorithm!r}",
        )
        _check(
            self.lock_kernel == "full" or self.random_key_penalty == 0,
            "random_key_penalty needs lock_kernel=full: a compact lock trains under its own key only",
        )
        if self.dp_clip is not None:
            _check(self.dp_clip > 0, f"dp_clip must be positive, got {self.dp_clip}")
            _check(
                self.client_weighting == "uniform",
                "DP-FedAvg (dp_clip) weights clients uniformly: it needs client_weighting=uniform",
            )
        if self.prune_fraction is not None:
            _check(0 <= self.prune_fraction < 1, f"prune_fraction must be in [0, 1), got {self.prune_fraction}")

    def to_json(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def locked(self):
        return self.algorithm == "fedkl"

    @property
    def control(self):
        """The FedAvg control ('fedavg-norm'): the lock blocks replaced by a plain normalisation with a
        learned affine (shared like every other weight), trained by FedAvg."""
        return self.algorithm == "fedavg-norm"

    def model_fn(self):
        shape, classes, seed = tuple(self.input_shape), self.num_classes, self.seed
        options = dict(init=self.init, seed=seed)
        if self.locked or self.control:
            where = {"first-two": 2}.get(self.lock_where, self.lock_where)
            options.update(normalization=self.normalization, where=where, control=self.control)
        if self.locked:
            options.update(
                key_dim=self.key_dim, affine=self.lock_affine, kernel=self.lock_kernel, round_noise=self.lock_noise
            )
        return lambda: models.build(self.model, shape, classes, lock=self.locked, **options)

    def client_optimizer(self):
        return optimizers.TorchSGD(self.learning_rate, self.momentum, self.nesterov, self.weight_decay)

    def model_aggregator(self):
        """DP-FedAvg's aggregator when `dp_clip` is set (TFF's fixed-clip Gaussian mean), else None."""
        if self.dp_clip is None:
            return None
        return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=float(self.dp_noise_multiplier),
            clients_per_round=float(self.clients_per_round),
            clip=float(self.dp_clip),
        )

    def round_learning_rate(self, round_num):
        """The client LR of (1-based) `round_num`: x lr_gamma at each milestone round passed."""
        return optimizers.multistep_learning_rate(self.learning_rate, self.lr_milestones, self.lr_gamma, round_num - 1)

    def client_key(self, client_id):
        """A fresh CSPRNG key of the run's `key_distribution`; with `seeded_keys` (experiments only)
        derived from the seed."""
        seed = [self.seed, int(client_id), 0x6B6579] if self.seeded_keys else None
        return keys_lib.generate_key(self.key_dim, seed=seed, distribution=self.key_distribution)

    def random_key(self, seed=None):
        """A key of the run's `key_distribution` that belongs to no client (an attacker's guess); a
        seed for reproducible evaluations (such keys are not secrets)."""
        return keys_lib.generate_key(self.key_dim, seed=seed, distribution=self.key_distribution)

    def client_lock_fn(self):
        """client id -> the client's initial lock weights: None (model_fn's, lock_init='shared') or
        fresh CSPRNG ones (lock_init='private'; with `seeded_keys` derived from the seed)."""
        if not self.locked or self.lock_init == "shared":
            return lambda client_id: None
        model = self.model_fn()()
        return lambda client_id: private.draw_lock_weights(
            model, [self.seed, int(client_id), 0x6C6F636B] if self.seeded_keys else None
        )


# The fields that hold real numbers (None: unset, where allowed): inf and nan are refused in every one.
_REAL_FIELDS = (
    "alpha",
    "learning_rate",
    "momentum",
    "weight_decay",
    "lr_gamma",
    "server_learning_rate",
    "random_key_penalty",
    "lock_noise",
    "dp_clip",
    "dp_noise_multiplier",
    "prune_fraction",
)


def _check(rule_holds, message):
    if not rule_holds:
        raise ConfigError(message)


# Fields that change the data or the schedule but not the process's computations: configs that
# differ only in these share one process (each set to a valid placeholder for the cache key).
_DRIVER_FIELDS = dict(
    dataset="digits",
    data_dir=None,
    num_clients=1,
    clients_per_round=1,
    local_epochs=1,
    batch_size=1,
    examples_per_client=None,
    fresh_examples=False,
    split="iid",
    alpha=1.0,
    learning_rate=1.0,
    lr_milestones=(),
    lr_gamma=1.0,
    seeded_keys=False,
    lock_init="shared",
)


def build_process(config, return_client_updates=False):
    """The run's process (cached: building traces the model and takes seconds)."""
    driver_fields = dict(_DRIVER_FIELDS)
    if config.random_key_penalty == 0:  # the clients draw no key in their computation then
        driver_fields.update(key_distribution="uniform")
    if config.dp_clip is not None:  # DP's mean divides by clients_per_round
        driver_fields.update(num_clients=config.clients_per_round, clients_per_round=config.clients_per_round)
    return _build_process(dataclasses.replace(config, **driver_fields), bool(return_client_updates))


@functools.lru_cache(maxsize=4)
def _build_process(config, return_client_updates):
    builder = algorithms.build_fedkl_process if config.locked else algorithms.build_fedavg_process
    return builder(
        config.model_fn(),
        config.client_optimizer(),
        tff.learning.optimizers.build_sgdm(learning_rate=config.server_learning_rate),
        client_weighting=config.client_weighting,
        statistics=config.statistics,
        persist_optimizer_state=config.persist_optimizer_state,
        return_client_updates=return_client_updates,
        model_aggregator=config.model_aggregator(),
        client_update_transform=None
        if config.prune_fraction is None
        else algorithms.prune_smallest(config.prune_fraction),
        **(
            dict(random_key_penalty=config.random_key_penalty, key_distribution=config.key_distribution)
            if config.locked
            else {}
        ),
    )
