"""The names a user chooses from (zoo models, data sets, normalisations, algorithms, key distributions), without
TensorFlow: the binaries validate their flags with them before TensorFlow loads. Each is defined here only; the
modules that implement them import it."""

MODELS = ("lenet", "resnet20", "resnet32", "resnet18", "resnet34", "vgg16")  # tfkl.models
INITS = ("pytorch", "dlg", "keras")  # tfkl.models: weight initialisation schemes
DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100")  # tfkl.data
SPLITS = ("iid", "dirichlet", "shards")  # tfkl.data: client splits
NORMALIZATIONS = ("batch", "group", "layer", "none")  # tfkl.keylock
ALGORITHMS = ("fedkl", "fedavg", "fedavg-norm")  # tfkl.federated.config
KEY_DISTRIBUTIONS = ("uniform", "gaussian", "rademacher")  # tfkl.keys
LOCK_WHERES = ("first", "first-two", "all")  # tfkl.federated.config
LOCK_AFFINES = ("channel", "spatial")  # tfkl.keylock
LOCK_KERNELS = ("full", "compact")  # tfkl.keylock
LOCK_INITS = ("shared", "private")  # tfkl.federated.config
STATISTICS = ("average", "local")  # tfkl.federated.algorithms
CLIENT_WEIGHTINGS = ("num_examples", "uniform")  # tfkl.federated.algorithms
