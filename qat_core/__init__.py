"""QAT Studio's engine: quantization-aware training, analysis, ONNX export and benchmarks.

Pure Python over PyTorch; never imports streamlit. onnx/onnxruntime are imported lazily.
"""

from qat_core.errors import QATError

__all__ = ["QATError"]
__version__ = "0.1.0"
