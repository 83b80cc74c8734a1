"""Runtimes beside ONNX Runtime: OpenVINO compiles the run's own int8.onnx, unchanged (no re-quantization).

OpenVINO is an optional extra (``pip install '.[openvino]'``), imported only when used. A model is compiled
for this CPU with one stream, the latency hint and the benchmark's thread count, under a precision hint:
``f32`` (exact float between the integer kernels) or OpenVINO's default (bf16 on CPUs with AVX-512 BF16
or AMX, f32 elsewhere) — the hint it resolved to is read back and saved with the timings. Which kernels
run in int8 is read from OpenVINO itself: each node of the compiled runtime model carries its
``layerType`` and ``runtimePrecision``.
"""

from __future__ import annotations

import importlib.util
import io
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qat_core.errors import ExportError, StoreError

NOT_INSTALLED = "OpenVINO not installed — pip install '.[openvino]'"
HINTS = ("f32", "default")  # the precision hints timed: exact f32, and what OpenVINO picks by itself
HEAVY_TYPES = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul"})  # the layers int8 is for
INT8_PRECISIONS = frozenset({"i8", "u8"})
DIFFERING_SHOWN = 20  # differing predictions named in a parity line
IR_STEM = "int8_openvino"  # the run's OpenVINO IR: int8_openvino.xml + int8_openvino.bin


def installed() -> bool:
    """Whether OpenVINO can be imported here (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def _openvino() -> Any:
    if not installed():
        raise ExportError(NOT_INSTALLED)
    import openvino

    return openvino


def version() -> str:
    return _openvino().__version__.split("-")[0]


def read(path: str | Path) -> Any:
    """An ONNX file (or IR .xml) read by OpenVINO; ExportError when it cannot read it."""
    ov = _openvino()
    path = Path(path)
    if not path.is_file():  # OpenVINO would wait on a FIFO
        raise StoreError(f"{path} does not exist or is not a regular file; run `qat-studio export RUN` first")
    try:
        return ov.Core().read_model(str(path))
    except Exception as err:  # OpenVINO raises RuntimeError with its whole trace as the message
        raise ExportError(f"OpenVINO cannot read {path.name} ({str(err).strip().splitlines()[0][:300]}); the file "
                          "is damaged or uses an op OpenVINO lacks — run `qat-studio export RUN` again") from None


def compile_model(path: str | Path, threads: int, hint: str = "f32") -> Any:
    """``path`` compiled for this CPU: ``threads`` inference threads, one stream, the latency hint, and the
    precision ``hint`` ("f32", or "default": OpenVINO's own choice)."""
    if hint not in HINTS:
        raise ExportError(f"precision hint must be one of {', '.join(HINTS)}; got {hint!r}")
    ov = _openvino()
    settings: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if hint == "f32":
        settings["INFERENCE_PRECISION_HINT"] = "f32"
    try:
        return ov.Core().compile_model(read(path), "CPU", settings)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"OpenVINO cannot compile {Path(path).name} for this CPU "
                          f"({str(err).strip().splitlines()[0][:300]})") from None


def precision(compiled: Any) -> str:
    """The float precision a compiled model runs its non-integer ops in ("f32", "bf16", "f16")."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def runner(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function batch → logits on one infer request (inputs shared, not copied, as ONNX Runtime does)."""
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    return run


def _info(rt: Any, key: str) -> str:
    return rt[key].astype(str) if key in rt else ""


def kernels(compiled: Any, layers: list[str]) -> dict[str, Any]:
    """The conv, fully connected and matmul nodes OpenVINO compiled, read from its runtime model: which run in
    int8 (``runtimePrecision`` i8/u8) and which in float, each named by the run's layer it came from."""
    from qat_core.export import _layer_of

    int8, floating = [], []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = _info(rt, "layerType")
        if kind not in HEAVY_TYPES:
            continue
        origin = [n for n in _info(rt, "originalLayersNames").split(",") if n] or [op.get_friendly_name()]
        layer = next((hit for n in origin if (hit := _layer_of(n, layers)) is not None), origin[0])
        row = {"layer": layer, "type": kind, "precision": _info(rt, "runtimePrecision"),
               "kernel": _info(rt, "primitiveType")}
        (int8 if row["precision"] in INT8_PRECISIONS else floating).append(row)
    return {"int8": int8, "float": floating, "int8_types": dict(Counter(r["type"] for r in int8))}


def agreement(logits: np.ndarray, evaluated: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A runtime's logits against the run's evaluation on the same samples: accuracy, top-1 agreement, and the
    differing predictions named (sample, label, evaluated class, runtime class; the first ``DIFFERING_SHOWN``)."""
    ours, theirs = evaluated.argmax(1), logits.argmax(1)
    agree = ours == theirs
    differing = [{"sample": int(i), "label": int(labels[i]), "evaluated": int(ours[i]), "runtime": int(theirs[i])}
                 for i in np.flatnonzero(~agree)[:DIFFERING_SHOWN]]
    return {"samples": int(len(labels)), "accuracy": float((theirs == labels).mean()),
            "evaluated_accuracy": float((ours == labels).mean()), "agreement": float(agree.mean()),
            "disagreements": int((~agree).sum()), "max_logit_diff": float(np.abs(logits - evaluated).max()),
            "differing": differing}


def parity(qat: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
           runs: dict[str, Callable[[np.ndarray], np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Each of ``runs`` (name → batch → logits) against the run's evaluation (its integer arithmetic, as
    ``export.parity`` compares ONNX Runtime) over ``batches`` of the test split, in one pass."""
    evaluated, labels = [], []
    logits: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    with torch.no_grad():
        for x, y in batches:
            with qat.integer_arithmetic():
                evaluated.append(qat(x).as_subclass(torch.Tensor).numpy())
            labels.append(y.numpy())
            for name, run in runs.items():
                logits[name].append(run(x.numpy()))
    if not labels:
        raise StoreError("the run has an empty test split; parity needs test data")
    s, y = np.concatenate(evaluated), np.concatenate(labels)
    return {name: agreement(np.concatenate(out), s, y) for name, out in logits.items()}


# --- the OpenVINO IR of a run ------------------------------------------------------------------------

def write_ir(int8_path: Path, folder: Path, stem: str = IR_STEM) -> dict[str, Path]:
    """``int8_path`` as OpenVINO IR (``stem``.xml + ``stem``.bin) in ``folder``: the same graph OpenVINO reads
    from the ONNX file, float constants kept in f32 (not compressed to f16), so it predicts the same."""
    from qat_core.store import atomic_write_bytes

    ov = _openvino()
    model = read(int8_path)
    with tempfile.TemporaryDirectory(prefix="qat-ov-") as tmp:
        xml = Path(tmp) / f"{stem}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        written = {}
        for suffix in (".xml", ".bin"):
            written[suffix] = folder / f"{stem}{suffix}"
            atomic_write_bytes(written[suffix], xml.with_suffix(suffix).read_bytes())
    return written


def run_ir(store: Any, run_id: str) -> dict[str, Path]:
    """The run's int8 model as OpenVINO IR in its folder (exported to ONNX first when it is not yet)."""
    from qat_core import export

    _, int8_path = export._ensure_exported(store, run_id)
    return write_ir(int8_path, store.run_dir(run_id))


def ir_zip(store: Any, run_id: str) -> bytes:
    """The run's OpenVINO IR as one zip, named for people (``digits-cnn_W8A8_int8_openvino.xml`` and ``.bin``)."""
    from qat_core import export

    stem = export.file_stem(store.get(run_id)["config"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for suffix, path in run_ir(store, run_id).items():
            bundle.write(path, f"{stem}_{IR_STEM}{suffix}", zipfile.ZIP_DEFLATED)
    return buffer.getvalue()
