"""Federated FedKL and FedAvg on TensorFlow Federated, with private persistent client state."""

from tfkl.federated.algorithms import (CLIENT_WEIGHTINGS, STATISTICS, StatefulClientsProcess, build_fedavg_process,
                                       build_fedkl_process)
