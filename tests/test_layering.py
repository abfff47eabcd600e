"""The layering of DESIGN.md, checked on the source: no import cycle (imports inside functions
included), arrows that go one way, and one home for the work-folder layout.

Every `import` and `from ... import` statement anywhere in a module counts, at any depth.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "configs", "flows", "cli")

# What model/ may read from pipeline/: the shard format, the tokenizer, the leaf file helpers,
# and the instruction records' split (decontamination must hold out exactly the test split
# that fine-tuning tests on).
MODEL_READS_FROM_PIPELINE = {"pipeline.shards", "pipeline.encoding", "pipeline.files",
                             "pipeline.instructions"}
# Which packages each may import (besides itself): cli -> flows, configs, model, pipeline ...
ALLOWED = {
    "pipeline": set(),
    "model": {"pipeline"},
    "configs": {"pipeline", "model"},
    "flows": {"configs", "model", "pipeline"},
    "cli": {"flows", "configs", "model", "pipeline"},
}
# Only the orchestration commands (server, serve, run) import the flows.
CLI_MODULES_USING_FLOWS = {"cli.orchestration"}
LAYOUT_NAMES = {"manifest.json", "dataset.zarr", "test_responses.json", ".prefect-cache"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, from every import statement in its file."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from model import evaluate` imports the module model.evaluate
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` -> the module a.b.c or a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "cli.training" in graph["cli.main"]  # imported inside build_parser()
    assert "pipeline.registry" in graph["flows.stages"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detection_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_layer_arrows_go_one_way() -> None:
    wrong = []
    for module, targets in import_graph().items():
        layer = module.split(".")[0]
        for target in targets:
            target_layer = target.split(".")[0]
            if target_layer == layer:
                continue
            if target_layer not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target} ({layer} may not import {target_layer})")
            elif layer == "model" and target not in MODEL_READS_FROM_PIPELINE:
                wrong.append(f"{module} imports {target}: model reads from pipeline only "
                             f"{sorted(MODEL_READS_FROM_PIPELINE)}")
            elif (layer == "cli" and target_layer == "flows"
                  and module not in CLI_MODULES_USING_FLOWS):
                wrong.append(f"{module} imports {target}: only {CLI_MODULES_USING_FLOWS} may")
    assert not wrong, "\n".join(wrong)


def _external_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_libraries_do_not_import_prefect_and_the_file_helpers_are_a_leaf() -> None:
    for name, path in module_files().items():
        if name.split(".")[0] in ("pipeline", "model", "configs"):
            assert "prefect" not in _external_imports(path), f"{name} imports prefect"
    leaf = _external_imports(REPO / "pipeline" / "files.py") - {"__future__"}
    assert leaf <= set(sys.stdlib_module_names), f"pipeline/files.py imports {leaf}"


def test_only_the_layout_module_spells_work_folder_names() -> None:
    spelled = []
    for name, path in module_files().items():
        if name == "pipeline.files":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                spelled.append(f"{name}:{node.lineno} spells {node.value!r}")
            if isinstance(node, ast.Subscript) and ast.unparse(node).endswith("parents[2]"):
                spelled.append(f"{name}:{node.lineno} climbs out of a checkpoint by hand")
    assert not spelled, "use pipeline.files.WorkFolder:\n" + "\n".join(spelled)
