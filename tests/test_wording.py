"""The tracked text says what the code is and does, never how the project was developed: no work periods, work items,
notes outside the repository or "the default back then". Each hit is listed as FILE:LINE: text."""
import re
import subprocess

import pytest

from conftest import ROOT

SUFFIXES = (".py", ".md", ".txt", ".ini", ".cff", ".json", ".sh")
PATTERNS = [                                           # case-insensitive; each names development, not the code
    r"\bwaves?\b",                                      # a work period
    r"(?<!process )\bsessions?\b",                      # a work period (a process session, setsid's, is code)
    r"\bissues? #?\d+",                                 # a work item
    r"\bitems? \d+\b(?!\.\.)",                          # a work item (items 0..n-1 of a dataset are data)
    r"\btoday'?s?\b", r"\bthis machine\b", r"\buntil now\b", r"\bcame later\b",
    r"\bthe defaults? before\b", r"\bdefaults? of the day\b", r"\bwhen it was (run|fixed)\b",
    r"\b(third|fourth|fifth) pass\b",                  # (a model's first pass, as in self-conditioning, is code)
    r"shared/notes|anchors-turn\d",                     # working notes that are not part of the repository
]
HISTORY = re.compile("|".join(PATTERNS), re.I)


def tracked_text_files() -> list:
    """The repository's tracked text files this rule covers (not tests/data, not this file's pattern list)."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [n for n in names.splitlines()
            if (n.endswith(SUFFIXES) or n == ".ci/run") and not n.startswith("tests/data/")
            and n != "tests/test_wording.py"]


def hits(names) -> list:
    """FILE:LINE: text of every line of `names` a pattern matches."""
    out = []
    for name in names:
        with open(f"{ROOT}/{name}", encoding="utf-8", errors="replace") as f:
            out += [f"{name}:{n}: {line.strip()[:120]}" for n, line in enumerate(f, 1) if HISTORY.search(line)]
    return out


def test_no_development_history_in_code_and_docs():
    assert hits(n for n in tracked_text_files() if n != "README.md") == []


def test_no_development_history_in_readme():
    assert hits(n for n in tracked_text_files() if n == "README.md") == []


@pytest.mark.parametrize("line,flagged", [
    ("# ---- item 3: --class-dropout 0 ----", True), ('"""Issue 12 (training side)', True),
    ("the suite's time over this session's three CI runs", True), ("measured in wave 4", True),
    ("today's default", True), ("(shared/notes/anchors-turn3.md)", True), ("the defaults of the day", True),
    ("built-in items 0..num-1 with this seed", False), ("start_new_session=True", False),
    ("a grandchild in another process session holds the pipe", False), ("a microwave", False),
    ("the fourth pass over the README", True), ("a first pass without gradient gives x0", False),
])
def test_patterns_tell_history_from_code(line, flagged):
    assert bool(HISTORY.search(line)) == flagged
