"""The layering of ``raysynth/``, read from the code's own imports (module level and inside functions).

Layers, low to high: base (config, io, errors, runtime, storage, console) < data < artifacts < library
(diffusion, quality, downstream, analysis, render, design, status, estimate) < stages < pipeline and cli. A module
imports only from its own layer or below; a stage never imports another stage (it reads their
output through ``artifacts``); the modules that run inside Ray workers and actors import no driver
code; and no two modules import each other, directly or round a longer cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raysynth"

LAYERS = {
    "base": 0, "data": 1, "artifacts": 2, "library": 3, "stages": 4, "top": 5,
}
BASE = {"config", "presets", "io", "errors", "runtime", "storage", "console", "__init__"}
LIBRARY = {"diffusion", "quality", "downstream", "analysis", "render", "design", "status", "estimate"}
WORKER_MODULES = {
    "raysynth.diffusion.worker", "raysynth.diffusion.sampler", "raysynth.diffusion.tune_trial",
    "raysynth.downstream.trial", "raysynth.downstream.robust_eval", "raysynth.downstream.curate",
}
"""What Ray runs in workers and actors: the Train loop, the sampling actor, the tune and study
trials, the robustness task and the curation task."""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head in BASE:
        return "base"
    if head == "data":
        return "data"
    if head == "artifacts":
        return "artifacts"
    if head in LIBRARY:
        return "library"
    if head == "stages":
        return "stages"
    if head in ("pipeline", "cli"):
        return "top"
    raise AssertionError(f"{module}: not in any layer; add it to tests/test_architecture.py")


def imports_of(path: Path) -> set[str]:
    """Every raysynth module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("raysynth")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raysynth"):
            for alias in node.names:  # "from raysynth.render import figures" imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() else node.module)
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_layer():
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module):
    mine = LAYERS[layer_of(module)]
    upward = [m for m in GRAPH[module] if m in GRAPH and LAYERS[layer_of(m)] > mine]
    assert not upward, f"{module} ({layer_of(module)}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer_of(m) == "stages" and m != "raysynth.stages"))
def test_stages_read_each_other_only_through_artifacts(module):
    sideways = [m for m in GRAPH[module] if layer_of(m) == "stages" and m != module]
    assert not sideways, f"{module} imports another stage: {sideways}; read its output through raysynth.artifacts"


@pytest.mark.parametrize("module", sorted(WORKER_MODULES))
def test_ray_workers_import_library_code_only(module):
    assert module in GRAPH, f"{module} is gone; update WORKER_MODULES"
    driver = [m for m in GRAPH[module] if layer_of(m) in ("stages", "top")]
    assert not driver, f"{module} runs in Ray workers but imports driver code: {driver}"


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path ``[a, b, ..., a]``, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycles():
    # A package's __init__ is imported with any of its modules; it must not import them back.
    graph = {m: {i for i in deps if i != m} for m, deps in GRAPH.items()}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder and the layer rule catch what they are meant to catch."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    assert layer_of("raysynth.stages.train") == "stages" and LAYERS["library"] < LAYERS["stages"]
    with pytest.raises(AssertionError, match="not in any layer"):
        layer_of("raysynth.somewhere_new")
