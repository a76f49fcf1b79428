"""The package's layers import only downward: tools -> modules -> autograd -> ops (-> the C++ extension).

Every import of every file of the package, read with ``ast`` (those inside functions too), is resolved to
the module it names; a name taken from the package's top (``from densenet_fused import convert``) is the
public API, which imports every layer: no layer below the tools imports it."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "densenet_fused"
# what a layer must never import (the top's own helpers, _checks, _loader, _version, are below every layer)
FORBIDDEN = {
    "ops": {"autograd", "modules", "tools"},
    "autograd": {"modules", "tools"},
    "modules": {"tools"},
    "base": {"ops", "autograd", "modules", "tools"},  # densenet_fused/_checks.py, _loader.py, _route.py, _version.py
}
RUNTIME = sorted(FORBIDDEN)


def layer_of(module: str) -> str:
    """The layer of a dotted name of the package: ops, autograd, modules, tools, base (a helper file at the
    top: _checks, _loader, _version, the extension) or api (the top itself or a public name of it)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in ("ops", "autograd", "modules", "tools"):
        return parts[1]
    top_file = os.path.isfile(os.path.join(ROOT, PACKAGE, parts[1] + ".py")) or parts[1] in ("_C", "_build_info")
    return "base" if top_file else "api"


def _names_of(node: ast.AST, package: str):
    """The dotted modules of the package an import node names (a name of ``from X import name`` counts as
    X.name, which is X's submodule or an attribute of X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            up = package.split(".")
            base = ".".join(up[:len(up) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [f"{base}.{a.name}" if a.name != "*" else base for a in node.names]
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def imported_layers(rel: str, source: str):
    """(dotted module, its layer) for each import of the package in ``source``, the file at ``rel``
    (a path under the repository root)."""
    package = ".".join(rel.split("/")[:-1])  # the package the file is in (an __init__.py: its own)
    found = []
    for node in ast.walk(ast.parse(source, rel)):
        for name in _names_of(node, package):
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.append((name, layer_of(name)))
    return found


def file_layer(rel: str) -> str:
    parts = rel.split("/")
    if len(parts) == 2:
        return "top" if parts[1] == "__init__.py" else "base"
    return parts[1]


def violations(rel: str, source: str):
    """The imports of ``source`` (the file at ``rel``) that run up out of its layer; no layer imports the
    package's top (api), which imports them all."""
    forbidden = FORBIDDEN.get(file_layer(rel), set())
    bad = set(forbidden) | ({"api"} if forbidden else set())
    return [f"{rel} imports {name} ({layer})" for name, layer in imported_layers(rel, source) if layer in bad]


def package_files():
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def test_every_layer_imports_only_downward():
    files = [rel for rel in package_files() if file_layer(rel) in FORBIDDEN]
    assert {file_layer(rel) for rel in files} == set(RUNTIME), files
    bad = [v for rel in files for v in violations(rel, _read(rel))]
    assert bad == [], "\n".join(bad)


def test_the_runtime_never_imports_the_tools():
    bad = [f"{rel} imports {name}" for rel in package_files() if file_layer(rel) != "tools"
           for name, layer in imported_layers(rel, _read(rel)) if layer == "tools"]
    assert bad == [], "\n".join(bad)


def test_the_imports_are_resolved():
    """The check reads the real arrows: the known downward imports are found, with their layers."""
    dense = dict(imported_layers("densenet_fused/modules/dense.py", _read("densenet_fused/modules/dense.py")))
    assert dense["densenet_fused.autograd.block.FusedDenseBlockFunction"] == "autograd"
    assert dense["densenet_fused.ops.block_ops"] == "ops"
    assert dense["densenet_fused._checks.has_hooks"] == "base"
    block = dict(imported_layers("densenet_fused/autograd/block.py", _read("densenet_fused/autograd/block.py")))
    assert block["densenet_fused.autograd.distributed.StatsGroup"] == "autograd"
    assert block["densenet_fused.ops.launch.mark"] == "ops"


@pytest.mark.parametrize("rel, line", [
    ("densenet_fused/autograd/block.py", "from ..modules.dense import FusedDenseBlock"),
    ("densenet_fused/autograd/block.py", "from ..modules import FusedDenseBlock"),
    ("densenet_fused/autograd/block.py", "from .. import convert"),
    ("densenet_fused/autograd/head.py", "def f():\n    from densenet_fused.tools import cli"),
    ("densenet_fused/ops/launch.py", "from ..autograd import block"),
    ("densenet_fused/ops/launch.py", "import densenet_fused.modules.dense"),
    ("densenet_fused/ops/launch.py", "importlib.import_module('densenet_fused.autograd.block')"),
    ("densenet_fused/modules/dense.py", "from ..tools.cost import CASES"),
    ("densenet_fused/modules/__init__.py", "from ..tools import bench"),
    ("densenet_fused/_checks.py", "from .modules import FusedDenseBlock"),
])
def test_an_import_that_runs_up_is_found(rel, line):
    assert violations(rel, _read(rel) + "\n" + line + "\n") != []
    assert violations(rel, _read(rel)) == []
