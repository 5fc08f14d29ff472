"""The repository describes the software, not how or when it was written: no file outside the
gathered real files (tests/fixtures/) speaks of work sessions, plans or what changed since when, and
dates appear only next to measured figures (docs/performance.md, docs/corpus.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()

# Words that narrate development. Broader words ("earlier", "no longer") also describe what a program
# does ("an earlier token", "an input no longer read"), so they are left to review, not to this test.
NARRATIVE = re.compile(
    r"|".join(
        [
            r"\bsessions?[ -]\d",
            r"\b(this|that|next|previous|last|first|later|each|every) (work )?session\b",
            r"\b(before|since|after|until|in) session\b",
            r"\bwork periods?\b",
            r"\b(was|were) added (in|since|when|by)\b",
            r"\bpreviously\b",
            r"\bused to be\b",
            r"\bas built\b",
            r"\b(differences?|differs?|departures?) from the plan\b",
            r"\bthe plan (says|asks|had)\b",
            r"\(before, (it|the|porter|they|this|that|an?) ",
        ]
    ),
    re.IGNORECASE,
)
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
# Measured figures carry the date they were measured: the performance tables and the corpus survey.
DATES_ALLOWED = {"docs/performance.md", "docs/corpus.md"}


def _tracked_text_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in listed.split("\0"):
        if not name or name.startswith("tests/fixtures/") or name == THIS_FILE:
            continue
        path = REPO_ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(name)
    return files


def test_no_file_narrates_development():
    found = []
    for name in _tracked_text_files():
        for number, line in enumerate((REPO_ROOT / name).read_text(errors="replace").splitlines(), 1):
            match = NARRATIVE.search(line)
            if match:
                found.append(f"{name}:{number}: {match.group(0)!r}: {line.strip()[:120]}")
    assert not found, "development narrative:\n" + "\n".join(found)


def test_dates_only_next_to_measurements():
    found = []
    for name in _tracked_text_files():
        if name in DATES_ALLOWED:
            continue
        for number, line in enumerate((REPO_ROOT / name).read_text(errors="replace").splitlines(), 1):
            if DATE.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, f"dates outside {sorted(DATES_ALLOWED)}:\n" + "\n".join(found)


def test_no_file_points_outside_the_repository():
    """Documents and code name files of this repository, not of the checkout's surroundings."""
    outside = re.compile(r"\.\./shared/|/work/(main|shared)\b")
    found = []
    for name in _tracked_text_files():
        for number, line in enumerate((REPO_ROOT / name).read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "pointers outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("line", "narrates"),
    [
        ("verified on CPU (session 7)", True),
        ("Before session 6 this showed only as a shape error", True),
        ("the port (before, it was ported as an ordinary rope)", True),
        ('after = run_rewrites(before, "prune")', False),
        ("## Differences from the plan", True),
        ('@pytest.fixture(scope="session")', False),
        ("the sampler reads every earlier token", False),
        ("`x` is passed in but no longer read", False),
    ],
)
def test_the_pattern_tells_narrative_from_reference(line, narrates):
    assert bool(NARRATIVE.search(line)) == narrates
