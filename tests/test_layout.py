"""The layout shows the architecture, and the imports keep to it: model.py and grape.py at the
root over the shipped package modeling/, repository-only training/ above them, programs in
scripts/ on top; no import circle; no module imports a program."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"train_adam_finewebedu"}          # plus every scripts/ module but the shared helpers
SCRIPT_LIBRARIES = {"scripts.bench_common"}
# the design card's names, the three packages, and the pages
ROOT_ENTRIES = {"model.py", "grape.py", "train_adam_finewebedu.py", "config", "data", "lm-evaluation-harness",
                "pretrain.sh", "tests", "README.md", "LICENSE", "requirements.txt", "pyproject.toml",
                "modeling", "training", "scripts", "docs", "results"}


def repository_modules() -> dict[str, str]:
    files = glob.glob(os.path.join(ROOT, "*.py")) + [
        f for pkg in ("modeling", "training", "scripts") for f in glob.glob(os.path.join(ROOT, pkg, "*.py"))]
    modules = {}
    for f in files:
        name = os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".")
        if not name.endswith("__init__"):
            modules[name] = f
    return modules


def imports_of(name: str, path: str, modules: dict) -> set[str]:
    """Repository modules that ``name`` imports, at any depth (inside functions too)."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"{package}.{node.module}" if node.module else package
                candidates = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
            else:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = repository_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_import_graph_is_found():
    graph = import_graph()
    assert "model" in graph["training.trainer"] and "grape" in graph["scripts.bench_attention"]
    assert "modeling.bias" in graph["grape"] and "modeling.attention" in graph["model"]


def test_no_import_circle():
    graph, done, on_path = import_graph(), set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(module):] + [module]))
        if module in done:
            return
        on_path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_no_module_imports_a_program():
    graph = import_graph()
    programs = PROGRAMS | {m for m in graph if m.startswith("scripts.") and m not in SCRIPT_LIBRARIES}
    offenders = {m: sorted(graph[m] & programs) for m in graph if graph[m] & programs}
    assert offenders == {}


def test_layers_point_one_way():
    """modeling/ is shipped in checkpoint folders: it imports only itself; model.py and
    grape.py import nothing repository-only; training/ imports no program."""
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("modeling."):
            assert all(d.startswith("modeling.") for d in deps), (module, deps)
        if module in ("model", "grape"):
            assert not any(d.startswith(("training.", "scripts.")) for d in deps), (module, deps)
        if module.startswith("training."):
            assert not any(d.startswith("scripts.") or d in PROGRAMS for d in deps), (module, deps)


def test_root_holds_the_design_cards_names():
    tracked = os.popen(f"git -C {ROOT} ls-files").read().split()
    if not tracked:                                  # not a git checkout: nothing to compare
        return
    top = {path.split("/")[0] for path in tracked} - {".gitignore", ".ci"}
    assert top <= ROOT_ENTRIES, sorted(top - ROOT_ENTRIES)
