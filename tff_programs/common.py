"""Flag choices and helpers shared by the tfkl binaries (kept free of heavy imports)."""

import sys

from absl import app

MODELS = ("lenet", "resnet20", "resnet32", "resnet18", "resnet34", "vgg16")
DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100")
INITS = ("pytorch", "dlg", "keras")
NORMALIZATIONS = ("batch", "group", "layer", "none")


def check_no_positional_args(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def fail(message):
    """Ends the program with one clear error line."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_dataset(name, data_dir=None):
    from tfkl import data
    try:
        return data.load(name, data_dir)
    except (data.DataUnavailableError, OSError, ValueError) as e:
        fail(str(e))


def input_shape(model_name, dataset):
    """The model's input: 32x32 for LeNet/ResNet-20/32 (the paper's), 224 for the larger models;
    channels follow the data (grey stays grey)."""
    channels = dataset.x_train.shape[-1]
    size = 32 if model_name in ("lenet", "resnet20", "resnet32") else 224
    return (size, size, channels)
