"""experiments/ as a room of its own: not in the wheel, importing the product and never imported by it, its
modules keeping to each other's public names; short functions and no tracker references anywhere a user reads."""

import ast
import os
import re
import tomllib

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = ("tfkl", "attacks", "tff_programs")


def _python_files(folder):
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def installed_packages():
    """The packages setuptools installs from pyproject.toml: [tool.setuptools] packages, an explicit list or
    `find` (where / include / exclude), else setuptools' automatic discovery of the flat layout."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f).get("tool", {}).get("setuptools", {})
    packages = config.get("packages")
    if isinstance(packages, list):
        return sorted(packages)
    find = (packages or {}).get("find")
    if find is None:
        from setuptools.discovery import FlatLayoutPackageFinder

        return sorted(FlatLayoutPackageFinder.find(ROOT))
    where = [os.path.join(ROOT, w) for w in find.get("where", ["."])]
    found = [
        p for w in where for p in setuptools.find_packages(w, find.get("exclude", ()), find.get("include", ("*",)))
    ]
    return sorted(found)


def test_the_wheel_holds_the_product_and_not_the_experiments():
    packages = installed_packages()
    assert {p.split(".")[0] for p in packages} == set(PRODUCT)
    # Every package of the product is in it (a sub-package left out would be missing from the wheel).
    assert set(setuptools.find_packages(ROOT, include=[f"{p}*" for p in PRODUCT])) <= set(packages)
    assert not any(p.split(".")[0] in ("experiments", "benchmarks", "tests") for p in packages)


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_the_product_never_imports_the_experiments():
    offenders = [
        os.path.relpath(path, ROOT)
        for package in PRODUCT
        for path in _python_files(package)
        if any(name.split(".")[0] in ("experiments", "benchmarks") for name in _imports(path))
    ]
    assert offenders == []


def _product_modules():
    """{module name: its file} of the product's packages."""
    modules = {}
    for package in PRODUCT:
        for path in _python_files(package):
            name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            modules[name.removesuffix(".__init__")] = path
    return modules


def test_the_product_imports_downward_only_and_without_cycles():
    """tfkl below attacks below tff_programs; tfkl's core never imports tfkl.federated; no module cycle (imports
    inside functions included)."""
    modules = _product_modules()
    edges = {  # a module's own packages aside: Python runs their __init__ before it whatever it imports
        m: {n for n in _imports(path) if n in modules and not (m == n or m.startswith(n + "."))}
        for m, path in modules.items()
    }
    rank = {"tfkl": 0, "attacks": 1, "tff_programs": 2}
    upward = [(m, n) for m, ns in edges.items() for n in ns if rank[n.split(".")[0]] > rank[m.split(".")[0]]]
    core = [(m, n) for m, ns in edges.items() for n in ns if n.startswith("tfkl.federated") and m.startswith("tfkl")]
    assert upward == [] and [(m, n) for m, n in core if not m.startswith("tfkl.federated")] == []
    done, cycles = set(), []

    def visit(module, stack):
        if module in stack:
            cycles.append(stack[stack.index(module) :] + [module])
        elif module not in done:
            for n in sorted(edges[module]):
                visit(n, stack + [module])
            done.add(module)

    for module in sorted(modules):
        visit(module, [])
    assert cycles == []


def _module_aliases(tree):
    """{local name: module} of `import a.b as c` / `from a import b [as c]` naming experiments' modules."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("experiments"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("experiments") and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def test_no_experiment_module_reaches_into_anothers_private_names():
    offenders = []
    for path in _python_files("experiments"):
        tree = ast.parse(open(path).read())
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
                offenders += [f"{path}: from {node.module} import {a.name}" for a in node.names if a.name[0] == "_"]
    assert offenders == []


def test_one_place_takes_the_tff_runtime_from_tff_programs():
    users = sorted(
        os.path.relpath(path, ROOT)
        for path in _python_files("experiments")
        if any(name.startswith(("tff_programs.contexts", "tff_programs.launch")) for name in _imports(path))
    )
    assert users == ["experiments/runtime.py"]


def test_no_function_is_over_80_lines():
    long = []
    for path in (path for folder in PRODUCT + ("experiments",) for path in _python_files(folder)):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{os.path.relpath(path, ROOT)}: {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_no_tracker_issue_numbers_in_code_or_docs():
    folders = PRODUCT + ("experiments", "tests")
    paths = [path for folder in folders for path in _python_files(folder)]
    docs = [
        os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")
    ]
    pages = [os.path.join("results", name) for name in sorted(os.listdir(os.path.join(ROOT, "results")))]
    pages = [page for page in pages if page.endswith(".md")]  # the results' pages, which users read too
    paths += [
        os.path.join(ROOT, name) for name in ["README.md", "CHANGELOG.md", "experiments/README.md", *docs, *pages]
    ]
    found = []
    for path in paths:
        for number, line in enumerate(open(path), 1):
            if re.search(r"\bissues?\s*#?\d+", line, re.IGNORECASE) or re.search(r"(?<![\w&])#\d+\b", line):
                found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()[:80]}")
    assert found == []
