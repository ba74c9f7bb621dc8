"""The package: version, console scripts, the federated extra's pins, Keras 2 and tfkl.federated's import error."""

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib

import pytest
import tensorflow as tf

import tfkl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)
SCRIPTS = PYPROJECT["project"]["scripts"]


def _python(code, **env):
    """Runs `code` in a fresh interpreter that imports this checkout; returns its CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_version_is_single_sourced():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tfkl.version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", tfkl.__version__)
    try:
        installed = importlib.metadata.version("tfkl")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None:
        assert installed == tfkl.__version__, "stale install: pip install -e . again"
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        first_release = re.search(r"^## \[?(\d+\.\d+\.\d+)", f.read(), re.M).group(1)
    assert first_release == tfkl.__version__


def test_installed_console_scripts_match_pyproject():
    try:
        distribution = importlib.metadata.distribution("tfkl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tfkl is not installed (pip install -e .)")
    installed = {e.name: e.value for e in distribution.entry_points if e.group == "console_scripts"}
    assert installed == SCRIPTS


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_resolves_to_a_callable(name):
    module_name, attribute = SCRIPTS[name].split(":")
    function = getattr(importlib.import_module(module_name), attribute)
    assert callable(function)
    # Each script runs the binary of its name (the binaries' flags clash, so they are not imported together here).
    binary = "tff_programs." + name.removeprefix("tfkl-").replace("-", "_")
    assert importlib.util.find_spec(binary) is not None
    assert function.__doc__.startswith(f"{name}: ") and f"({binary})" in function.__doc__


def test_attack_script_prints_its_flags():
    result = _python(
        "import sys; from tff_programs import scripts; sys.argv = ['tfkl-attack', '--help']; scripts.attack()"
    )
    assert "--attack" in result.stdout and "--threat" in result.stdout, result.stderr[-2000:]  # absl exits 1


def test_federated_extra_pins_agree_with_requirements():
    pins = {}
    for name in ("requirements.txt", "requirements-tff.txt"):
        with open(os.path.join(ROOT, name)) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if "==" in line:
                    package, version = line.split("==")
                    pins[package.lower().replace("_", "-")] = version
    for requirement in PYPROJECT["project"]["optional-dependencies"]["federated"]:
        package, version = requirement.split("==")
        assert pins.get(package.lower().replace("_", "-")) == version, requirement


def test_federated_import_error_names_the_extra():
    result = _python(
        "import sys\nsys.modules['tensorflow_federated'] = None\n"
        "try:\n    import tfkl.federated\nexcept ImportError as e:\n    print(e)\n"
    )
    message = result.stdout.strip()
    assert len(message.splitlines()) == 1, result.stdout + result.stderr[-2000:]
    assert "`federated` extra" in message and "Python 3.9-3.11" in message and "TensorFlow 2.14" in message


def test_tf_keras_is_keras_2():
    assert not str(getattr(tf.keras, "__version__", "2")).startswith("3")
    assert isinstance(tfkl.KeyLock(key_dim=4), tf.keras.layers.Layer)


@pytest.mark.skipif(tuple(map(int, tf.__version__.split(".")[:2])) < (2, 16), reason="tf.keras is Keras 3 from TF 2.16")
def test_keras_3_is_refused_in_one_line():
    result = _python("import tfkl", TF_USE_LEGACY_KERAS="0")
    assert result.returncode != 0
    assert "ImportError: tfkl needs Keras 2 but tf.keras is Keras 3" in result.stderr


def test_tfkl_is_the_bottom_layer():
    """tfkl imports neither the attacks nor the programs (they import tfkl)."""
    import ast
    import pathlib

    upper = ("attacks", "tff_programs", "benchmarks", "experiments")
    found = []
    for path in sorted(pathlib.Path(tfkl.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in upper]
    assert not found
