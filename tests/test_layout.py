"""The layout's promises (issue 14): no import circle, no train script importing another, config resolution that
returns a new config, models rebuilt through the registry."""
import ast
import os

import pytest

from conftest import ROOT


def import_graph() -> dict:
    """module -> the project modules it imports (at module level or inside functions)."""
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {}
    for m in mods:
        with open(os.path.join(ROOT, m + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        deps |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = deps & mods - {m}
    return graph


def test_no_import_circle_and_no_train_script_imports_another():
    graph = import_graph()
    assert {"trainer", "train_dit", "train_ldm", "latents", "registry"} <= graph.keys()
    for a in (m for m in graph if m.startswith("train_")):
        assert not {b for b in graph[a] if b.startswith("train_")}, a
    seen, done = [], set()

    def visit(m):                                           # depth-first: a module met again on the path is a circle
        assert m not in seen, " -> ".join(seen[seen.index(m):] + [m])
        if m in done:
            return
        seen.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        seen.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)


@pytest.mark.parametrize("kind", ["dit", "ldm"])
def test_resolve_returns_a_new_config_and_the_registry_builds_it(kind):
    from config import parse_config
    from registry import FAMILIES
    family = FAMILIES[kind]
    cfg = parse_config(family.config, ["--cond", "text", "--num-classes", "3"])
    resolved = family.resolve(cfg)
    assert resolved is not cfg and cfg.corrupt_type == "auto" and resolved.corrupt_type == "swap"
    if kind == "ldm":                                       # the text width the U-Net decides, in the new config only
        assert cfg.text_width == 0 and resolved.text_width == 64
    model, diffusion = family.build(resolved)
    assert model.cond.kind == "text" and diffusion.num_timesteps == 1000
