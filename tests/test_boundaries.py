"""The engine never pulls in the UI, and stays light to import."""

import subprocess
import sys


def test_importing_the_engine_leaves_streamlit_and_onnx_out():
    code = ("import sys, qat_core, qat_core.cli, qat_core.runner, qat_core.store; "
            "print(sorted(m for m in ('streamlit', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
