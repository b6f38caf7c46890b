"""The package's layering (docs/architecture.md, "Where things go"): imports point down, never up,
and no two modules import each other. Read from the source with `ast`, so every import counts,
including the lazy ones inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import craft_ext

PACKAGE = Path(craft_ext.__file__).parent

#: lowest first; a module may import its own layer or lower ones. The longest matching prefix wins.
LAYERS = [
    ("craft_ext", "craft_ext.extension", "craft_ext._C", "craft_ext.ops", "craft_ext.utils"),
    ("craft_ext.policies",),
    ("craft_ext.anchors",),
    ("craft_ext.engine",),
    ("craft_ext.config", "craft_ext.train_config"),
    ("craft_ext.baselines", "craft_ext.evaluation", "craft_ext.offline_kit", "craft_ext.sim"),
    ("craft_ext.trainer",),
    (  # the command-line programs
        "craft_ext.train", "craft_ext.eval", "craft_ext.build_anchor_cache", "craft_ext.demo",
        "craft_ext.offline_kit.__main__", "craft_ext.sim.record",
    ),
]


def _layer(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return level


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """A source module, a package, or the compiled extension (craft_ext._C, installed beside the sources)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or name == "craft_ext._C"


def _imports(path: Path) -> set[str]:
    """craft_ext modules that `path` imports (a `from package import name` counts as the submodule
    `name` when it is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_module(sub) else base)
    return {m for m in found if m == "craft_ext" or m.startswith("craft_ext.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_two_modules_import_each_other():
    graph = _graph()
    mutual = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})
    assert not mutual, mutual


def test_the_graph_is_read():
    """The checks above are not vacuous: known edges are found."""
    graph = _graph()
    assert "craft_ext.engine.surgery" in graph["craft_ext.engine.step"]
    assert "craft_ext.ops" in graph["craft_ext.engine.surgery"]
    assert "craft_ext.baselines.fixed_penalty" in graph["craft_ext.trainer.constraint"]
