"""The accuracy matrix of a federated run (FedKL: who can use the model with which secret).

  python -m tff_programs.evaluate --root_dir=runs/fedkl

Prints the matrix and writes it as JSON (default root_dir/evaluation.json). For a FedAvg run it
reports the global model's accuracy. Accuracies are measured on the test split minus the part
held out as the lock-recovery attacker's public data.
"""

import json
import os

from absl import flags, logging

from tff_programs import common, contexts, launch

_ROOT_DIR = flags.DEFINE_string("root_dir", None, "Root dir of a training run.")
_ROUND = flags.DEFINE_integer("round", None, "Round to evaluate (default: the last complete one).", lower_bound=0)
_PUBLIC_SIZES = flags.DEFINE_list(
    "public_sizes",
    ["100", "1000"],
    "Public labelled examples of the lock-recovery attacker (empty: no entry (e), every test example evaluates).",
)
_MAX_CLIENTS = flags.DEFINE_integer(
    "max_clients", 10, "Clients evaluated (those that took part most recently).", lower_bound=1
)
_RECOVERY_STEPS = flags.DEFINE_integer(
    "recovery_steps", 300, "Fine-tuning steps of the lock-recovery attacker.", lower_bound=1
)
_SEED = flags.DEFINE_integer("eval_seed", 0, "Seed of the public/evaluation cut, random keys and fine-tuning.")
_BY_ROUND = flags.DEFINE_bool(
    "accuracy_by_round",
    False,
    "Also measure entry (a) (FedAvg: the global model) for "
    "every complete round on disk (train with --keep_rounds >= --rounds).",
)
_OUT = flags.DEFINE_string("out", None, "JSON output (default root_dir/evaluation.json).")

flags.mark_flag_as_required("root_dir")


def _check_out(values):
    """--out (default root_dir/evaluation.json) is a file path that can be written."""
    out = values["out"] or os.path.join(values["root_dir"] or "", "evaluation.json")
    if os.path.isdir(out):
        raise flags.ValidationError(f"--out {out} is a directory; give a file path")
    return common.writable_dir_validator("out")(os.path.dirname(os.path.abspath(out)))


flags.register_multi_flags_validator(["root_dir", "out"], _check_out)
flags.register_validator(
    "public_sizes", lambda v: all(s.isdigit() and int(s) > 0 for s in v), "--public_sizes must be positive integers"
)


def main(argv):
    from attacks import lock_recovery
    from tfkl.federated import evaluation, run_dir
    from tfkl.federated.config import ProgramError
    from tfkl.files import atomic_write

    del argv  # launch.parse_flags refused positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not os.path.isdir(_ROOT_DIR.value):
        common.fail(f"--root_dir {_ROOT_DIR.value} does not exist")
    out = _OUT.value or os.path.join(_ROOT_DIR.value, "evaluation.json")
    contexts.install_context()
    try:
        result = evaluation.evaluate(
            _ROOT_DIR.value,
            _ROUND.value,
            tuple(int(s) for s in _PUBLIC_SIZES.value),
            _MAX_CLIENTS.value,
            _RECOVERY_STEPS.value,
            _SEED.value,
            progress=True,
            lock_recovery=lock_recovery.recover,
        )
        if _BY_ROUND.value:
            result["accuracy_by_round"] = evaluation.accuracy_by_round(
                _ROOT_DIR.value,
                max(int(s) for s in _PUBLIC_SIZES.value),
                _MAX_CLIENTS.value,
                _SEED.value,
                progress=True,
            )
    except ProgramError as e:
        writer = run_dir.writer_pid(_ROOT_DIR.value)
        common.fail(f"{e} (process {writer} is training this run: evaluate again when it ends)" if writer else e)
    finally:
        contexts.shutdown()
    print(evaluation.format_matrix(result))
    with atomic_write(out, binary=False) as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    contexts.ignore_tff_exit_noise()  # before the flags: a flag error ends the program before main
    launch.run(main)
