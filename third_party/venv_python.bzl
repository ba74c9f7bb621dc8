"""Repository rule: the project's virtualenv Python (`.venv/bin/python`) as the Python toolchain.

Its path is absolute, so it is computed on each machine at fetch time rather than committed; set
TFKL_PYTHON to use another interpreter (it must have requirements.txt installed).
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "python3",
    interpreter_path = "{python}",
    python_version = "PY3",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _venv_python_impl(ctx):
    python = ctx.os.environ.get("TFKL_PYTHON", "")
    if not python:
        python = "%s/.venv/bin/python" % ctx.path(Label("@//:WORKSPACE")).dirname
    if not ctx.path(python).exists:
        fail("no Python at %s: run `make venv` first (or set TFKL_PYTHON)" % python)
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", _BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["TFKL_PYTHON"],
    local = True,
)
