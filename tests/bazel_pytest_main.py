"""Entry point of the Bazel py_test targets: runs pytest on the test file given as argument.

Uses the repository's pytest.ini, so tests marked slow stay out unless PYTEST_ADDOPTS selects them;
`bazel test --test_filter=EXPR` becomes `pytest -k EXPR`.
"""

import os
import sys

import pytest


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["-c", os.path.join(root, "pytest.ini"), "--rootdir", root, *argv]
    if os.environ.get("XML_OUTPUT_FILE"):  # Bazel's per-test report
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):  # bazel test --test_filter=EXPR -> pytest -k EXPR
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    code = pytest.main(args)
    # A file whose tests are all slow has nothing to run in the fast suite.
    return 0 if code == pytest.ExitCode.NO_TESTS_COLLECTED else int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
