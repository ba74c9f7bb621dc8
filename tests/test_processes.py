"""Processes and start-up of the binaries: TFF's worker ends with a killed driver; flags (--help, a bad flag) are
answered before TensorFlow loads; the CUDA-factory noise of TensorFlow's import is dropped, real errors are not."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.helpers import kill_group
from tfkl import names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("train", "evaluate", "attack", "demo", "train_central", "worker")
NOISE = (
    "2026-11-26 15:27:52.427569: E tensorflow/compiler/xla/stream_executor/cuda/cuda_dnn.cc:9342] Unable to "
    "register cuDNN factory: Attempting to register factory for plugin cuDNN when one has already been registered",
    "2026-11-26 15:27:52.427821: E tensorflow/compiler/xla/stream_executor/cuda/cuda_fft.cc:609] Unable to register "
    "cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered",
    "2026-11-26 15:27:52.427845: E tensorflow/compiler/xla/stream_executor/cuda/cuda_blas.cc:1518] Unable to "
    "register cuBLAS factory: Attempting to register factory for plugin cuBLAS when one has already been registered",
)


def _python(code, pythonpath=ROOT, timeout=300):
    env = dict(os.environ, PYTHONPATH=pythonpath, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _run_binary(binary, *args):
    """Runs `python -m tff_programs.<binary> args` in-process; prints its exit code and whether TF loaded."""
    return _python(
        "import runpy, sys\n"
        f"sys.argv = ['{binary}', *{list(args)!r}]\n"
        "try:\n"
        f"    runpy.run_module('tff_programs.{binary}', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'tensorflow' in sys.modules)\n"
    )


def _gone(process):
    """True once `process` has ended (a zombie waiting for a parent to reap it counts as ended)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_training_driver_takes_its_tff_worker_along(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    with open(tmp_path / "train.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tff_programs.train", f"--root_dir={tmp_path / 'run'}", "--rounds=100"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the cleanup below kills that group, by its id
        )
    try:
        deadline = time.monotonic() + 240
        workers = []
        while not workers and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            workers = [
                child
                for child in psutil.Process(driver.pid).children()
                if any("worker_binary" in part for part in child.cmdline())
            ]
        assert workers, f"no TFF worker started; driver exit code {driver.poll()}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 5
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(w) for w in workers), "the TFF worker outlived its killed driver"
    finally:
        kill_group(driver)


@pytest.mark.parametrize("binary", BINARIES)
def test_help_exits_0_with_the_flags_before_tensorflow_loads(binary):
    result = _run_binary(binary, "--help")
    assert result.stdout.splitlines()[-1] == "exit 0 False", result.stderr[-2000:]
    flag = {"worker": "--port", "demo": "--root_dir", "evaluate": "--root_dir"}.get(binary, "--model")
    assert flag in result.stdout and "Try --helpfull" in result.stdout


@pytest.mark.parametrize("binary", BINARIES)
@pytest.mark.parametrize("bad_flag, message", [("--no_such_flag=1", "error: Unknown command line flag 'no_such_flag'")])
def test_a_bad_flag_is_one_error_line_before_tensorflow_loads(binary, bad_flag, message):
    result = _run_binary(binary, bad_flag)
    assert result.stdout.splitlines() == ["exit 1 False"], result.stderr[-2000:]
    assert result.stderr.splitlines() == [message]


@pytest.mark.parametrize("binary", ["train", "attack", "train_central"])
def test_a_bad_choice_names_the_choices_in_one_line(binary):
    result = _run_binary(binary, "--model=lenet5")
    assert result.stdout.splitlines() == ["exit 1 False"], result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: flag --model=lenet5: value should be one of") and all(
        m in line for m in names.MODELS
    )


def test_tfkl_and_its_names_load_without_tensorflow():
    result = _python(
        "import sys\nimport tfkl\nfrom tfkl import names\nprint('tensorflow' in sys.modules)\n"
        "import tensorflow as tf\nprint(isinstance(tfkl.KeyLock(key_dim=4), tf.keras.layers.Layer))\n"
        "from tfkl import models  # imports the submodule tfkl.securing; tfkl.secure is the function\n"
        "print(callable(tfkl.secure))"
    )
    assert result.stdout.split() == ["False", "True", "True"], result.stderr[-2000:]


def test_names_are_those_the_library_implements():
    import attacks
    from attacks import base
    from attacks import names as attack_names
    from tfkl import models

    assert names.MODELS == tuple(models._ARCHITECTURES)  # pylint: disable=protected-access
    assert attack_names.ATTACKS == tuple(attacks.ATTACKS)
    assert attack_names.ADAPTIVE_STRATEGIES == tuple(base.ADAPTIVE_STRATEGIES)


def test_the_attack_vocabulary_loads_without_tensorflow():
    result = _python("import sys\nimport attacks.names\nprint('tensorflow' in sys.modules)\n")
    assert result.stdout.split() == ["False"], result.stderr[-2000:]


def test_tensorflow_import_drops_the_cuda_factory_noise_and_nothing_else(tmp_path):
    """A stand-in `tensorflow` that writes the three noise lines and real errors to file descriptor 2."""
    (tmp_path / "tensorflow").mkdir()
    lines = [NOISE[0], "E real error: cuDNN is broken", NOISE[1], NOISE[2], "Unable to register cuDNN factory: other"]
    (tmp_path / "tensorflow" / "__init__.py").write_text(
        f"import os, sys\nos.write(2, {''.join(line + chr(10) for line in lines).encode()!r})\n"
        "print('a Python warning', file=sys.stderr)\n"
    )
    code = textwrap.dedent(
        """
        import sys
        from tff_programs import launch
        launch.import_tensorflow()
        print('after the import', file=sys.stderr)
        """
    )
    result = _python(code, pythonpath=f"{tmp_path}{os.pathsep}{ROOT}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "E real error: cuDNN is broken",
        "Unable to register cuDNN factory: other",
        "a Python warning",
        "after the import",
    ]


def test_sigint_while_tensorflow_loads_ends_with_its_one_line_on_the_terminal(tmp_path):
    """A stand-in `tensorflow` that is interrupted while it loads (file descriptor 2 is the filter's pipe then)."""
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n"
    )
    code = textwrap.dedent(
        """
        import signal
        import tff_programs
        from tff_programs import launch
        signal.signal(signal.SIGINT, tff_programs.interrupted)
        launch.import_tensorflow()
        """
    )
    result = _python(code, pythonpath=f"{tmp_path}{os.pathsep}{ROOT}")
    assert result.returncode == 130
    assert result.stderr.splitlines() == ["error: interrupted (SIGINT); run the same command again to resume"]


def test_the_real_tensorflow_import_is_quiet():
    result = _python(
        "from tff_programs import launch\nlaunch.import_tensorflow()\nimport tensorflow as tf\nprint(tf.__version__)"
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
    assert "Unable to register" not in result.stderr
