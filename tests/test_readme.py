"""The user's guide: README.md stays short, its quickstart runs, and every relative link in it, docs/ and the
CHANGELOG leads to a file (and heading) that exists. docs/REPORT.md is generated: its generator checks it."""

import glob
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO

README = os.path.join(REPO, "README.md")
GUIDES = [README, os.path.join(REPO, "CHANGELOG.md")] + sorted(
    p for p in glob.glob(os.path.join(REPO, "docs", "*.md")) if os.path.basename(p) != "REPORT.md"
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", read(path)), re.M):
        base = slug(heading)
        found.add(base if base not in counts else f"{base}-{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return found


def relative_links(path):
    """(target file, anchor or None) of each relative link outside code blocks."""
    for target in LINK.findall(FENCE.sub("", read(path))):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        yield os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path, anchor or None


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(guide):
    broken = []
    for target, anchor in relative_links(guide):
        if not os.path.exists(target):
            broken.append(f"{os.path.relpath(target, REPO)} (no such file)")
        elif anchor and target.endswith(".md") and anchor not in anchors(target):
            broken.append(f"{os.path.relpath(target, REPO)}#{anchor} (no such heading)")
    assert not broken, f"{os.path.relpath(guide, REPO)}: broken links: {broken}"


def test_readme_is_at_most_250_lines():
    assert len(read(README).splitlines()) <= 250


def quickstart_code():
    """The ```python blocks of the README's Quickstart section, in order."""
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", read(README), re.M | re.S).group(1)
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) >= 2, "the quickstart trains, then attacks"
    return "\n".join(blocks)


def test_quickstart_runs_and_prints_the_attack_result(tmp_path):
    """The quickstart as a user pastes it: 3 FedKL rounds on digits in TFF, a capture, GRNN's adaptive attack on it."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, "-c", quickstart_code()],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: TFF's worker goes with it below
    )
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output[-3000:]
    assert "round 3: loss" in output
    assert re.search(r"^fedkl/adaptive: \d/4 = \d+ % \[\d+, \d+\] % images recovered; labels", output, re.M), output[
        -3000:
    ]
    assert (tmp_path / "runs" / "quickstart" / "attack" / "captures_grid.png").exists()
