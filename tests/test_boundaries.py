"""The engine never pulls in the UI, and stays light to import."""

import subprocess
import sys


def test_importing_the_engine_leaves_streamlit_and_onnx_out():
    code = ("import sys, qat_core, qat_core.cli, qat_core.runner, qat_core.store; "
            "print(sorted(m for m in ('streamlit', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# DESIGN.md's module list, top to bottom: a module imports only modules above it (lazily or not)
LAYERS = ["errors", "progress", "files", "plugins", "cpu", "config", "quant_math", "integer", "observers", "quantizers", "modules", "graph", "prepare",
          "planning", "summary", "data", "library", "zoo", "train", "store", "runner", "analysis", "search", "plots", "export",
          "runtimes", "bench", "report", "sweep", "cli"]


def _engine_imports(path):
    import ast

    tree = ast.parse(path.read_text())
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "qat_core":
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qat_core."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("qat_core."))


def test_modules_import_only_modules_above_them():
    from pathlib import Path

    import qat_core

    root = Path(qat_core.__file__).parent
    modules = {p.stem for p in root.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "add the new module to LAYERS (and DESIGN.md's list)"
    upward = sorted(f"{name} imports {other}" for name in LAYERS for other in set(_engine_imports(root / f"{name}.py"))
                    if LAYERS.index(other) >= LAYERS.index(name))
    assert upward == []
