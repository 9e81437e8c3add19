"""The layout's promises: the top level is the tutorial and the entry points, the instruments live
in folders of their own and import the core, never the reverse; no import circle; at most 7 floors of imports; no
train script importing another; config resolution returns a new config; models rebuilt through evaluate.families()."""
import ast
import os

import pytest

from conftest import ROOT

CORE_FOLDERS = ("models", "sources", "plumbing")     # the networks, the data readers, the shared plumbing: core
INSTRUMENTS = ("weights", "scoring", "trackers", "tools")   # import the core; the core never imports them
CORE = {"cep", "cads", "corrupt", "conditions", "diffusion", "config", "data", "runio", "trainer"}
ENTRY_POINTS = {"train_dit", "train_ldm", "evaluate", "sweep"}


def project_modules() -> dict:
    """Dotted module name -> its file, for the top level and the folders (tests excluded)."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for folder in CORE_FOLDERS + INSTRUMENTS:
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith(".py") and f != "__init__.py":
                mods[f"{folder}.{f[:-3]}"] = os.path.join(ROOT, folder, f)
    return mods


def import_graph() -> dict:
    """module -> the project modules it imports (at module level or inside functions: a lazy import is an arrow too)."""
    mods = project_modules()
    graph = {}
    for m, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        graph[m] = {x for x in names if x in mods} - {m}
    return graph


def floors(graph: dict) -> dict:
    """module -> its floor: 1 for a module importing no project module, else 1 + the highest floor it imports."""
    memo = {}

    def floor(m, path=()):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m):] + (m,))
        if m not in memo:
            memo[m] = 1 + max((floor(dep, path + (m,)) for dep in graph[m]), default=0)
        return memo[m]
    for m in graph:
        floor(m)
    return memo


def test_top_level_is_the_tutorial_and_the_entry_points():
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert top == CORE | ENTRY_POINTS, sorted(top ^ (CORE | ENTRY_POINTS))
    assert len(top) <= 14


def room_graph(graph: dict) -> dict:
    """The import graph with each folder as one room (as a reader sees the house): room -> the rooms it imports."""
    room = lambda m: m.split(".")[0]
    rooms = {}
    for m, deps in graph.items():
        rooms.setdefault(room(m), set()).update(room(d) for d in deps if room(d) != room(m))
    return rooms


def test_no_circle_at_most_seven_floors_and_no_train_script_imports_another():
    graph = import_graph()
    for g in (graph, room_graph(graph)):                   # modules, and folders as rooms: no circle either way
        level = floors(g)
        top = max(level.values())
        assert top <= 7, {m: f for m, f in level.items() if f == top}
    for a in (m for m in graph if m.startswith("train_")):
        assert not {b for b in graph[a] if b.startswith("train_")}, a


def test_the_core_imports_no_instrument():
    graph = import_graph()
    core = CORE | {m for m in graph if m.split(".")[0] in CORE_FOLDERS}
    for m in sorted(core):
        bad = {dep for dep in graph[m] if dep.split(".")[0] in set(INSTRUMENTS) | ENTRY_POINTS}
        assert not bad, f"{m} (core) imports {sorted(bad)}"


@pytest.mark.parametrize("name", ["cep", "cads"])
def test_cep_and_cads_are_copyable_files_of_one_idea(name):
    """Each imports torch and the standard library only; cep.py holds CEP alone (<= 160 lines with its docstring)."""
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"torch", "math", "numbers", "contextlib"}, imported
    if name == "cep":
        assert len(source.splitlines()) <= 160 and not {"CADS", "anneal"} & {getattr(n, "name", "") for n in tree.body}


@pytest.mark.parametrize("kind", ["dit", "ldm"])
def test_resolve_returns_a_new_config_and_families_build_it(kind):
    from config import parse_config
    from evaluate import families
    family = families()[kind]
    cfg = parse_config(family.config, ["--cond", "text", "--num-classes", "3"])
    resolved = family.resolve(cfg)
    assert resolved is not cfg and cfg.corrupt_type == "auto" and resolved.corrupt_type == "swap"
    if kind == "ldm":                                       # the text width the U-Net decides, in the new config only
        assert cfg.text_width == 0 and resolved.text_width == 64
    model, diffusion = family.build(resolved)
    assert model.cond.kind == "text" and diffusion.num_timesteps == 1000
