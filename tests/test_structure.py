"""The package's import graph: no cycles, and nothing below the trainer imports it.

Read from the source with `ast` (nothing is imported), counting imports at module level and inside
functions alike: a lazy import is still an arrow. Layers, bottom up: the plugin (routing, router,
dispatch, layer, spec, config, errors, _mcore, flops formulas), then run/ (what a run is), then
megatron_lm/ and train/ on run/, sweep/ on train/, and export/ and inference/ on run/ and
megatron_lm/. Entry points (`__main__` modules) keep to their layer too: a recipe's FLOPs are
`megatron_nullmoe.train.flops`'s command, not `megatron_nullmoe.flops`'s.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_nullmoe"
ROOT = "megatron_nullmoe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, files) -> list[str]:
    """Modules named by `from X import a, b`: X.a where that is a module, else X itself (so
    `from megatron_nullmoe import _mcore` is an arrow to _mcore, not to the package's face)."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its body)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names += _resolve(module, path.name == "__init__.py", node, files)
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path a -> ... -> a, or [] when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # spec.py -> layer.py at module level; train/loop.py -> train/flops.py inside a method.
    assert "megatron_nullmoe.layer" in graph["megatron_nullmoe.spec"]
    assert "megatron_nullmoe.train.flops" in graph["megatron_nullmoe.train.loop"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_is_acyclic():
    cycle = _cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_nothing_below_the_trainer_imports_it():
    # what reads trained models (export, generate, evaluate) sits above the trainer, as sweeps do
    above = (f"{ROOT}.train", f"{ROOT}.sweep", f"{ROOT}.export", f"{ROOT}.inference",
             f"{ROOT}.generate", f"{ROOT}.evaluate")
    wrong = sorted(
        f"{module} -> {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if dep.startswith(f"{ROOT}.train")
        and not module.startswith(above)
    )
    assert not wrong, "imports up into megatron_nullmoe.train: " + ", ".join(wrong)


def test_only_the_trainer_and_sweeps_reach_into_train_and_the_run_layer_stays_below_them():
    # what a run *is* (config, model builder, tokenizer, data, checkpoint reading) lives in run/,
    # which export, inference, generate and evaluate read; train/ holds what only training needs
    graph = import_graph()
    into_train = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                        if d.startswith(f"{ROOT}.train")
                        and not m.startswith((f"{ROOT}.train", f"{ROOT}.sweep")))
    assert not into_train, "imports into train/ from outside train/ and sweep/: " + \
        ", ".join(into_train)
    above_run = (f"{ROOT}.train", f"{ROOT}.sweep", f"{ROOT}.export", f"{ROOT}.inference",
                 f"{ROOT}.generate", f"{ROOT}.evaluate", f"{ROOT}.megatron_lm")
    up = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                if m.startswith(f"{ROOT}.run") and d.startswith(above_run))
    assert not up, "run/ imports a layer above it: " + ", ".join(up)


# The package root holds the plugin core; commands live in their folders (train/, sweep/,
# export/, inference/). generate.py and evaluate.py stay at the root only so that the command lines
# users type keep working: each forwards to inference/ and holds no code of its own.
ROOT_CORE = {"__init__", "collectives", "config", "errors", "host_syncs", "layer", "model_utils",
             "parallel", "qk_norm", "router", "spec", "upcycle"}
ROOT_ENTRY_POINTS = {"generate", "evaluate"}


def test_the_package_root_holds_the_plugin_core_and_two_entry_points():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ROOT_CORE | ROOT_ENTRY_POINTS, (
        f"unexpected at the package root: {sorted(root - ROOT_CORE - ROOT_ENTRY_POINTS)}; "
        f"missing: {sorted(ROOT_CORE | ROOT_ENTRY_POINTS - root)} (a command belongs in its "
        "folder; a module of the plugin core goes in ROOT_CORE)")
    graph = import_graph()
    for name in sorted(ROOT_ENTRY_POINTS):
        body = ast.parse((PACKAGE / f"{name}.py").read_text()).body
        code = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not code, f"{name}.py defines {code}: its code belongs in inference/{name}.py"
        assert graph[f"{ROOT}.{name}"] == {f"{ROOT}.inference.{name}"}


def test_no_module_is_over_500_lines():
    # a module that grows past this is doing two jobs (STYLE.md): split it along its seam
    long = sorted(f"{p.relative_to(PACKAGE.parent)} ({n})" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 500)
    assert not long, "modules over 500 lines: " + ", ".join(long)


def test_every_error_of_the_package_derives_from_its_one_base():
    """Each command catches errors.NullMoEError once; an error class outside it would escape as a
    traceback. The remote code (export/hf_code) runs without the package and is exempt."""
    classes = {}  # error class name -> its base names
    for path in PACKAGE.rglob("*.py"):
        if "hf_code" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                classes[node.name] = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
    assert len(classes) >= 15 and classes["NullMoEError"] == ["Exception"]

    def derives(name: str, seen=()) -> bool:
        return name == "NullMoEError" or any(
            b in classes and b not in seen and derives(b, seen + (name,)) for b in classes[name])

    outside = sorted(name for name in classes if not derives(name))
    assert not outside, f"error classes outside NullMoEError: {outside}"
