"""The house rules a reader relies on: imports flow one way (no module imports one that imports
it, even from inside a function), and project modules are imported at the top of a file, where a
reader sees a file's dependencies at a glance."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = ["dreamgym", "engine", "models", "runtime", "train", "eval"]
PACKAGES = ["envs", "kernels"]


def _modules() -> dict[str, str]:
    mods = {m: os.path.join(ROOT, m + ".py") for m in TOP}
    for pkg in PACKAGES:
        for f in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if f.endswith(".py"):
                name = pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                mods[name] = os.path.join(ROOT, pkg, f)
    return mods


def _imports(name: str, path: str, mods: dict) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function?) for every import in the file."""
    tree = ast.parse(open(path).read())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = (pkg + "." + base).strip(".") if base else pkg
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            hit = t if t in mods else t.partition(".")[0] if t.partition(".")[0] in mods else None
            if hit and hit != name:
                out.append((hit, id(node) in nested))
    return out


def test_no_import_cycles_among_project_modules():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods)} for m, p in mods.items()}
    graph = {m: deps - {d for d in deps if m.startswith(d + ".")} for m, deps in graph.items()}  # a package's own init

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
    assert "train" not in graph["eval"] or "eval" not in graph["train"]
    assert not any(d in ("train", "eval") for m in ("dreamgym", "runtime", "engine", "models") for d in graph[m])


def test_project_modules_are_imported_at_the_top():
    mods = _modules()
    local = [(m, t) for m, p in mods.items() for t, inside in _imports(m, p, mods) if inside]
    assert not local, f"function-local imports of project modules: {local}"
