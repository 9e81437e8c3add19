"""
The docs' promises checked against the code: every `python ...` / `torchrun ...` command in a fenced code block of
README.md and docs/**/*.md names a script or module that exists and passes only flags its parser has (and a value in
the flag's choices); sweep.py's --train "..." and --eval "..." words are checked against the train script and
evaluate.py. Every relative link resolves to a file, and its #anchor to a heading.

    python -m tools.doc_check              # one line per problem (FILE:LINE: ...); exit 1 if any
"""
import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import sweep
from sweep import flag_value
from tools.flags_doc import ROOT, parser_of

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
PLACEHOLDER = "SUBST"                                  # what a $(...) stands for once its command is taken out


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of the shell code blocks: `\\` continuations joined onto their first line."""
    out, lang, pending = [], None, None
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```\s*(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            continue
        if lang is None or lang not in SHELL_BLOCKS:
            continue
        start, body = (pending if pending else (n, ""))
        body += line.rstrip()
        if body.endswith("\\"):
            pending = (start, body[:-1] + " ")
        else:
            pending = None
            out.append((start, body))
    return out


def commands_in(line: str) -> list[list[str]]:
    """The simple commands of a shell line as word lists: $(...) taken out as commands of their own, split at
    && || ; | and comments dropped. A line shlex cannot read gives no command."""
    inner, subst = [], re.compile(r"\$\(([^()]*)\)")
    while (m := subst.search(line)):
        inner.append(m.group(1))
        line = line[:m.start()] + PLACEHOLDER + line[m.end():]
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        words = list(lex)
    except ValueError:
        return []
    cmds, cur = [], []
    for w in words:
        if w in OPERATORS:
            cmds, cur = cmds + [cur], []
        else:
            cur.append(w)
    return [c for c in cmds + [cur] if c] + [c for text in inner for c in commands_in(text)]


def invocation(words: list) -> tuple[str, list] | None:
    """(the script 'x.py' or module 'pkg.mod' a python / torchrun command runs, its arguments), else None."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):    # VAR=value before the command
        words = words[1:]
    if not words or not re.fullmatch(r"(python[0-9.]*|torchrun)", Path(words[0]).name):
        return None
    rest, torchrun = words[1:], words[0] == "torchrun"
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):      # the interpreter's own options
        takes_value = torchrun and "=" not in rest[0] and rest[0] != "--standalone"   # torchrun: --nnodes 2
        rest = rest[2:] if takes_value else rest[1:]
    if not rest or rest[0] == "-c":
        return None
    if rest[0] == "-m":
        return (rest[1], rest[2:]) if len(rest) > 1 else None
    return rest[0], rest[1:]


def target_problem(target: str) -> str | None:
    """Why `target` cannot be run from the repository root (None if it can, or if it is not this project's)."""
    if target.endswith(".py"):
        return None if (ROOT / target).is_file() else f"{target}: no such script"
    path = ROOT / target.replace(".", "/")
    if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
        return None
    if (ROOT / target.split(".")[0]).exists() or importlib.util.find_spec(target.split(".")[0]) is None:
        return f"python -m {target}: no such module"
    return None                                          # another package's module (pytest, pip): not checked here


def ours(target: str) -> bool:
    """Whether `target` is one of this project's entry points."""
    return target.endswith(".py") or (ROOT / target.split(".")[0]).is_dir()


def options(parser, args: list) -> dict:
    """option string -> action of the parser, with those of the subcommand `args` names (scoring.judge ref ...)."""
    found = {s: a for a in parser._actions for s in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((w for w in args if w in action.choices), None)
            if chosen:
                found.update(options(action.choices[chosen], []))
    return found


def flag_problems(name: str, args: list, known: dict, also: dict | None = None) -> list[str]:
    """The flags in `args` that `known` (or `also`: flags forwarded to another parser) lacks, and values outside a
    flag's choices."""
    problems, skip = [], False
    for i, word in enumerate(args):
        if skip or not word.startswith("-") or word in ("-", "--") or re.fullmatch(r"-[0-9.e+-]+", word):
            skip = False
            continue                                     # a flag's value, a positional argument, a negative number
        flag, _, value = word.partition("=")
        action = known.get(flag) or (also or {}).get(flag)
        if action is None:
            problems.append(f"{name}: {flag} is not a flag of it")
            continue
        if not value and action.nargs is None and i + 1 < len(args):
            value, skip = args[i + 1], True
        stand_in = any(s in value for s in ("$", "...", PLACEHOLDER))      # a value the reader fills in
        if action.choices and value and not stand_in and value not in map(str, action.choices):
            problems.append(f"{name}: {flag} {value}: not one of {', '.join(map(str, action.choices))}")
    return problems


def train_script_of(target: str, args: list) -> str:
    """The train script a sweep.py or tools.bench command drives: its --script, else its --preset's, else train_dit."""
    script = flag_value(args, "--script", None)
    if script is None and target == "sweep.py" and (preset := flag_value(args, "--preset", None)):
        script = sweep.PRESETS.get(preset, {}).get("script")
    return (script or "train_dit") + ".py"


def command_problems(target: str, args: list) -> list[str]:
    """What is wrong with running `target` with `args`: a missing script or module, an unknown flag or choice."""
    missing = target_problem(target)
    if missing or not ours(target):
        return [missing] if missing else []
    args = [a for a in args if a != "..."]
    known = options(parser_of(target, args), args)
    forwarded = None
    if target in ("tools.bench", "tools/bench.py"):      # its other flags are the train script's
        forwarded = options(parser_of(train_script_of(target, args)), [])
    problems = flag_problems(target, args, known, forwarded)
    if target == "sweep.py":
        for flag, script in (("--train", train_script_of(target, args)), ("--eval", "evaluate.py")):
            for i, word in enumerate(args[:-1]):
                if word == flag:
                    inner = shlex.split(args[i + 1])
                    problems += flag_problems(f"{target} {flag} ({script})", inner, options(parser_of(script), []))
    return problems


def link_problems(path: Path, text: str, root: Path = ROOT) -> list[str]:
    """Relative links of a Markdown page (outside code) that name no file, or an #anchor no heading of it has."""
    problems = []
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    for n, line in enumerate(prose.splitlines(), 1):
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line) + \
                re.findall(r"(?:src|href)=\"([^\"]+)\"", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):             # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root)}:{n}"
            if not dest.exists():
                problems.append(f"{where}: link {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: link {target}: no heading with that anchor in {file or path.name}")
    return problems


def anchors(text: str) -> set:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to '-', repeats -1, -2..."""
    seen, out = {}, set()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link's text only
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def page_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Every problem of one page: its commands, then its links."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for n, line in code_lines(text):
        for words in commands_in(line):
            if (call := invocation(words)) is not None:
                problems += [f"{path.relative_to(root)}:{n}: {p}" for p in command_problems(*call)]
    return problems + link_problems(path, text, root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.doc_check", description=__doc__.split("\n\n")[0].strip())
    p.parse_args(argv)
    problems = [q for page in doc_files() for q in page_problems(page)]
    print("\n".join(problems) if problems else f"{len(doc_files())} pages: every command and link checks out")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
