"""The house rules, checked on the source: passes stand alone, no import cycles, no module
reaches into another's private names, every module says what it is for."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name as installed (setup.py's package_dir)
PACKAGES = {ROOT / "tvm_rebirth": "tvm_rebirth", ROOT / "passes": "tvm_rebirth.passes"}


def _modules() -> dict:
    """{dotted module name: path} of every module of the installed package."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list:
    """[(imported module, imported names)] of every import statement, at any depth."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    result = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            result += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            result += [(m, []) for m in submodules]
            result.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return result


def _graph() -> dict:
    return {name: {target for target, _ in _imports(name, path) if target in MODULES
                   and target != name}
            for name, path in MODULES.items()}


def test_passes_do_not_import_the_tooling():
    for name, path in MODULES.items():
        if not name.startswith("tvm_rebirth.passes"):
            continue
        bad = [t for t, _ in _imports(name, path)
               if t.startswith("tvm_rebirth") and not t.startswith("tvm_rebirth.passes")]
        assert not bad, f"{path}: imports {bad}"


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of the data flow
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and
                                                       MODULES[t].name == "__init__.py")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_of_other_modules():
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path}: imports {private} from {target}"
        tree = ast.parse(path.read_text())
        # names bound to other libraries' modules (patching TVM's server loop is ours to own)
        external = {alias.asname or alias.name for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    and not (getattr(node, "level", 0) or (getattr(node, "module", "") or "")
                             .startswith("tvm_rebirth"))
                    for alias in node.names}
        for node in ast.walk(tree):  # obj._member where obj is not our own self
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                    not node.attr.startswith("__"):
                owner = node.value
                assert isinstance(owner, ast.Name) and owner.id in ("self", "cls", *external), (
                    f"{path}:{node.lineno}: reaches into a private member '{node.attr}'")


def test_every_module_says_what_it_is_for():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path}: no module docstring"
