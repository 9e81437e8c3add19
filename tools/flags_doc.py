"""
docs/flags.md, generated from the train scripts' config dataclasses: every flag with its default and help text, and
what each preset sets. Also parser_of, which reads any entry point's command-line parser without running its work
(tools/doc_check.py checks documented commands with it).

    python -m tools.flags_doc --write        # rewrite docs/flags.md
    python -m tools.flags_doc                # print the page
    python -m tools.flags_doc --check        # exit 1 if docs/flags.md differs from what the code says
"""
import argparse
import ast
import dataclasses
import importlib
import sys
import textwrap
from pathlib import Path
from unittest import mock

from plumbing.common import atomic_open

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "flags.md"
TRAIN_SCRIPTS = ("train_dit.py", "train_ldm.py")


class _Parsed(BaseException):
    """Raised where an entry point would parse its command line; carries the parser (a BaseException, so no
    `except Exception` of the entry point's own catches it)."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def module_of(target: str):
    """The module of an entry point: a script path ('train_dit.py', 'tools/bench.py') or a module name."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    name = target[:-3].replace("/", ".") if target.endswith(".py") else target
    return importlib.import_module(name)


def parser_of(target: str, argv=()) -> argparse.ArgumentParser:
    """The parser entry point `target` reads `argv` with: its main(argv) runs until it parses and stops there, so
    nothing else runs (argv picks a subcommand's parser, e.g. evaluate.py metrics)."""
    def stop(self, *args, **kwargs):
        raise _Parsed(self)
    module = module_of(target)
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            module.main(list(argv))
        except _Parsed as parsed:
            return parsed.parser
    raise ValueError(f"{target}: main() returned without parsing a command line")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, no HTML tags, no emphasis."""
    for a, b in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(a, b)
    return text


def _default(action) -> str:
    """An option's default as the page shows it."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return {True: "on", False: "off"}.get(action.default, "unset")
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    return f"`{action.default}`" if action.default != "" else "`''`"


def flag_table(parser, cls) -> list[str]:
    """One row per option of `parser`: flag, default, what a resume checks (cls's field metadata), help text."""
    fields = {f.name: f.metadata for f in dataclasses.fields(cls)}
    rows = ["| flag | default | resume | help |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        meta = fields.get(action.dest, {})
        resume = "arch" if meta.get("arch") else "experiment" if meta.get("experiment") else ""
        flags = " ".join(f"`{s}`" for s in action.option_strings)
        choices = f" ({' | '.join(map(str, action.choices))})" if action.choices else ""
        rows.append(f"| {flags} | {_default(action)} | {resume} | {_cell((action.help or '') + choices)} |")
    return rows


def preset_notes(script: str) -> dict:
    """preset name -> the comment lines written above it in the script's PRESETS, joined."""
    source = (ROOT / script).read_text(encoding="utf-8")
    lines = source.splitlines()
    notes = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRESETS":
            for key in node.value.keys:
                above, i = [], key.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    above.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                notes[key.value] = " ".join(above)
    return notes


def preset_section(script: str, module) -> list[str]:
    """Each preset of the script: its note and the flags it sets (explicit flags given with --preset win)."""
    from config import field_flags
    out, notes = [f"### Presets of {script}", ""], preset_notes(script)
    for name, values in module.PRESETS.items():
        pairs = " ".join("\0".join(field_flags(k, v)) for k, v in values.items())   # a flag and its value: one unit
        lines = textwrap.wrap(pairs, 116, break_on_hyphens=False, break_long_words=False)
        out += [f"#### `--preset {name}`", "", _cell(notes.get(name, "")), "", "```text",
                *(line.replace("\0", " ") for line in lines), "```", ""]
    return out


def render() -> str:
    """The whole of docs/flags.md."""
    out = ["# Flags of the train scripts", "",
           "<!-- Generated by `python -m tools.flags_doc --write` from config.py, train_dit.py and train_ldm.py: edit "
           "the fields' help texts there, not this page (tests/test_docs.py fails when it is stale). -->", "",
           "Every field of a train script's config is a `--kebab-case` flag; a boolean field has a `--no-` form. "
           "`--preset NAME` applies a recipe first and flags given explicitly win over it. `--print-config` prints "
           "the resolved config (preset and flags applied, `auto` values decided) as the command that reproduces it, "
           "one flag per line, and exits without starting a run.", "",
           "The *resume* column: `arch` fields define the network, and resuming a run with another value is refused; "
           "`experiment` fields define what the run trains on and how, and a resume refuses a change unless "
           "`--resume-override` names the field.", ""]
    for script in TRAIN_SCRIPTS:
        module = module_of(script)
        out += [f"## {script}", "", *flag_table(parser_of(script), module.FAMILY.config), "",
                *preset_section(script, module)]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.flags_doc", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(ROOT)}")
    p.add_argument("--check", action="store_true", help=f"exit 1 if {PAGE.relative_to(ROOT)} is stale")
    args = p.parse_args(argv)
    page = render()
    if args.check:
        fresh = PAGE.is_file() and PAGE.read_text(encoding="utf-8") == page
        state = "up to date" if fresh else "stale: run python -m tools.flags_doc --write"
        print(f"{PAGE.relative_to(ROOT)}: {state}")
        return 0 if fresh else 1
    if args.write:
        PAGE.parent.mkdir(exist_ok=True)
        with atomic_open(PAGE, "w") as f:
            f.write(page)
        return 0
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
