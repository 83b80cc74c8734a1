"""The numbers a run shows, each defined once: every page, the CLI, the report and the run's metrics call these.

- **Size** (:func:`predicted_sizes`, :func:`run_size` → :class:`Size`): the headline is the shipped
  file's bytes, ``int8.onnx`` (and ``fp32.onnx`` for FP32) once the run is exported; before that the
  same files as predicted from the layer table, labelled "predicted". The bit-packed size (what a
  sub-8-bit plan would take packed; ONNX stores 2..7-bit weights one per byte) is secondary and
  always labelled "bit-packed (not a file yet)". The ratio is "N× smaller file": FP32 file / int8 file.
- **Layers** (:func:`quantized_layers`): the one count named "quantized layers": the layers of the
  layer table (the input is not a layer) whose weights or output activations the plan quantizes.
  Other counts are named for what they count ("layers in the table", "integer-kernel coverage").
- **Integer-kernel coverage** (:func:`coverage_value`, :func:`coverage_text`, :func:`float_parts`): of the FP32
  model's Conv/Gemm/MatMul ops, how many ONNX Runtime runs as integer kernels ("57/59 heavy ops"), and
  everything left in float with the reason.
- **Accuracy** (:func:`pct`): one precision everywhere, two decimals ("91.25%"); points likewise.
- **The headline** (:func:`headline` → :class:`Headline`): ORT int8 accuracy beside FP32, the file
  size cut and the speed-up, each with the reason in its place while it is not measured yet, a
  noisy-timing warning, and :class:`Remark` s: a QAT "gain" over an undertrained FP32 baseline, and
  a fine-tune that lost to its own PTQ start. ``Headline.text()`` is the one-line form.

Pure functions of a run's dicts (``metrics``, ``config``, the bench result): no store, no UI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qat_core.config import LayerPlan
from qat_core.prepare import size_bytes

# What an ONNX file holds beyond its tensors (node protos, tensor names, shapes, the QDQ nodes' wiring),
# per row of the layer table. Measured on exported runs (digits-cnn, digits-mlp, torchvision resnet18
# and mobilenet_v3_small at W8A8): int8.onnx 1,215-1,480 B a row, fp32.onnx 240-310 B a row; the
# predicted files came within 5% of the real ones (mobilenet_v3_small's int8.onnx 4.3% under, the others
# within 1%).
INT8_GRAPH_BYTES_PER_ROW = 1350
FP32_GRAPH_BYTES_PER_ROW = 300
INT8_FILE, FP32_FILE = "int8.onnx", "fp32.onnx"
PACKED_LABEL = "bit-packed (not a file yet)"

# A QAT accuracy this far above the FP32 baseline means the baseline had room left to learn: the fine-tune
# kept training it. Half a point is about two samples of the digits test split (360): below it, seed noise.
GAIN_TOLERANCE = 0.005
# A fine-tune that ends this far below the PTQ model it started from did harm: one point is beyond the
# seed-to-seed spread of a short fine-tune on the small test splits here (about 3 digits samples).
LOSS_TOLERANCE = 0.01
# A benchmark whose p99 is this many times its median was disturbed by other work: ORT's own spread is far
# smaller (p99 1.2× the median for digits-cnn here, beside other jobs), while a preempted call shows as 10-35×.
# Its median may still hold, but say so before anyone quotes the speed-up.
NOISY_P99_OVER_MEDIAN = 3.0
BENCHMARK_PAGE = "Benchmark page (qat-studio bench)"


# --- formats ---------------------------------------------------------------------------------------
def pct(accuracy: float | None) -> str:
    """An accuracy (0..1) as every page shows it: two decimals, "91.25%"; "—" when missing."""
    return "—" if accuracy is None else f"{accuracy:.2%}"


def points(delta: float) -> str:
    """A difference of accuracies (0..1) in percentage points, signed: "+6.25 pt"."""
    return f"{delta * 100:+.2f} pt"


def size_text(nbytes: float) -> str:
    """Bytes for people: "31.9 KB" up to a megabyte, then "10.77 MB" (1 KB = 1024 B)."""
    return f"{nbytes / 1024:,.1f} KB" if nbytes < 1024**2 else f"{nbytes / 1024**2:,.2f} MB"


# --- size -------------------------------------------------------------------------------------------
def predicted_sizes(rows: list[dict], plan: LayerPlan) -> dict[str, float]:
    """``prepare.size_bytes`` (``fp32_bytes``, bit-packed ``quantized_bytes``, ``stored_bytes``) plus the
    predicted files: ``int8_file_bytes`` and ``fp32_file_bytes``. The int8 file holds, per quantized
    weight layer, a byte a weight, a float scale and an 8-bit zero point per channel, and its bias as
    int32 with an int32 zero point and a float scale per element; a scale and zero point per quantized
    activation; and its graph (``*_GRAPH_BYTES_PER_ROW``)."""
    sizes = size_bytes(rows, plan)
    int8 = 0.0
    for row in rows:
        spec = plan.spec_for(row["name"])
        bias = row["params"] - row["weight_params"]
        if row["has_weights"] and spec.weight_bits is not None:
            scales = row["out_channels"] if spec.granularity == "per_channel" else 1
            int8 += row["weight_params"] + 5 * scales + 12 * bias
        else:
            int8 += 4 * row["params"]
        if spec.act_bits is not None and not row.get("is_output"):
            int8 += 5
    return sizes | {"int8_file_bytes": int8 + INT8_GRAPH_BYTES_PER_ROW * len(rows),
                    "fp32_file_bytes": sizes["fp32_bytes"] + FP32_GRAPH_BYTES_PER_ROW * len(rows)}


# 8-bit weights pack to what int8.onnx stores, less a zero-point byte a channel (well under 3%); a narrower
# weight saves at least 1/8 of its bytes. Below this share of the stored bytes, packing is worth showing.
PACKED_SHOWN_BELOW = 0.97


@dataclass(frozen=True)
class Size:
    """A run's (or a draft's) size: the int8 and FP32 files, measured or predicted, and bit-packed."""

    int8_bytes: float  # int8.onnx: the headline size
    fp32_bytes: float  # fp32.onnx
    measured: bool  # True: the exported files' bytes; False: predicted from the layer table
    packed_bytes: float | None = None  # bit-packed, only when some weights are narrower than 8 bits

    @property
    def ratio(self) -> float:
        """How many times smaller the int8 file is than the FP32 file."""
        return self.fp32_bytes / self.int8_bytes

    @property
    def label(self) -> str:
        """"int8.onnx" or "int8.onnx, predicted"."""
        return INT8_FILE if self.measured else f"{INT8_FILE}, predicted"

    @property
    def fp32_label(self) -> str:
        """"fp32.onnx" or "fp32.onnx, predicted"."""
        return FP32_FILE if self.measured else f"{FP32_FILE}, predicted"

    def text(self) -> str:
        """"31.9 KB (int8.onnx)" / "33.5 KB (int8.onnx, predicted)"."""
        return f"{size_text(self.int8_bytes)} ({self.label})"

    def fp32_text(self) -> str:
        """"95.2 KB (fp32.onnx)" / "93.4 KB (fp32.onnx, predicted)"."""
        return f"{size_text(self.fp32_bytes)} ({self.fp32_label})"

    def ratio_text(self) -> str:
        """"3.0× smaller file" (before export: "3.0× smaller file (predicted: not exported yet)")."""
        return f"{self.ratio:.1f}× smaller file" + ("" if self.measured else " (predicted: not exported yet)")

    def packed_text(self) -> str | None:
        """"12.5 KB bit-packed (not a file yet)", or None for a plan of 8-bit weights."""
        return None if self.packed_bytes is None else f"{size_text(self.packed_bytes)} {PACKED_LABEL}"


def _size_of(sizes: dict[str, float], onnx: dict[str, Any] | None) -> Size:
    packed = sizes.get("quantized_bytes")
    if packed is not None and packed >= PACKED_SHOWN_BELOW * sizes.get("stored_bytes", 0.0):
        packed = None
    if onnx:
        return Size(onnx["int8_bytes"], onnx["fp32_bytes"], True, packed)
    return Size(sizes["int8_file_bytes"], sizes["fp32_file_bytes"], False, packed)


def draft_size(rows: list[dict], plan: LayerPlan) -> Size:
    """A plan's predicted size before any run (Model & data, Plan)."""
    return _size_of(predicted_sizes(rows, plan), None)


def run_quantized_layers(metrics: dict[str, Any], rows: list[dict] | None = None,
                         plan: LayerPlan | None = None) -> int | None:
    """A run's quantized-layer count: recorded when it finished (``metrics["quantized_layers"]``), else
    counted from its layer table and plan (runs from before the count was recorded); None without either."""
    if "quantized_layers" in metrics:
        return int(metrics["quantized_layers"])
    return quantized_layers(rows, plan) if rows is not None and plan is not None else None


def run_size(metrics: dict[str, Any], rows: list[dict] | None = None, plan: LayerPlan | None = None) -> Size | None:
    """A run's size: its exported files' bytes (``metrics["onnx"]``, written by the export), else the files
    predicted at the end of training (``metrics["size"]``); runs from before the prediction existed need
    their layer table and plan. None while the run has neither (running, failed)."""
    sizes = metrics.get("size") or {}
    if "int8_file_bytes" not in sizes and rows is not None and plan is not None:
        sizes = predicted_sizes(rows, plan)
    if metrics.get("onnx") and "int8_bytes" in metrics["onnx"]:
        return _size_of(sizes, metrics["onnx"])
    return _size_of(sizes, None) if "int8_file_bytes" in sizes else None


# --- layers -----------------------------------------------------------------------------------------
def quantized_layers(rows: list[dict], plan: LayerPlan) -> int:
    """The "quantized layers" count every page shows: layer-table rows other than the input whose weights
    (a convolution's or linear layer's) or output activations the plan quantizes. The network's output
    (its logits) stays float, so it counts only when its weights are quantized."""
    count = 0
    for row in rows:
        if row["kind"] == "input":
            continue
        spec = plan.spec_for(row["name"])
        weights = row["has_weights"] and spec.weight_bits is not None
        output = spec.act_bits is not None and not row.get("is_output")
        count += weights or output
    return count


def layers_in_table(rows: list[dict]) -> int:
    """The layer table's rows other than the input: "layers in the table"."""
    return sum(row["kind"] != "input" for row in rows)


# --- integer-kernel coverage ------------------------------------------------------------------------
def coverage_value(result: dict[str, Any]) -> str:
    """Integer-kernel coverage of an export (or parity) result: "57/59 heavy ops", the integer kernels in
    ONNX Runtime's optimized int8 graph of the FP32 model's Conv/Gemm/MatMul ops; results exported before
    those were counted give their layer count ("12/14 layers")."""
    if "heavy_ops" in result:
        return f"{result['integer_heavy_ops']}/{result['heavy_ops']} heavy ops"
    n_int, n_float = len(result.get("integer_layers") or []), len(result.get("float_layers") or [])
    return f"{n_int}/{n_int + n_float} layers"


def coverage_text(result: dict[str, Any]) -> str:
    """The one-line form: "integer-kernel coverage: 57/59 heavy ops (Conv/Gemm/MatMul of the FP32 model)";
    a model with nothing on integer kernels says so."""
    if "heavy_ops" not in result:
        return f"integer-kernel coverage: {coverage_value(result)}"
    if result["integer_heavy_ops"] == 0:
        return (f"integer-kernel coverage: {coverage_value(result)}: nothing runs as an integer kernel, all "
                f"{result['heavy_ops']} Conv/Gemm/MatMul ops of the FP32 model stay float")
    return f"integer-kernel coverage: {coverage_value(result)} (Conv/Gemm/MatMul of the FP32 model)"


def float_parts(result: dict[str, Any]) -> dict[str, str]:
    """Everything an export (or parity) result runs in float that matters → why: the layers left float,
    then the heavy ops ONNX Runtime runs in float outside them ("scope (MatMul ×3)")."""
    floating = result.get("float_layers") or {}
    parts = dict(floating) if isinstance(floating, dict) else {name: "runs in float" for name in floating}
    ops: dict[tuple[str, str], list[str]] = {}
    for op in result.get("float_heavy_ops") or []:
        if op["layer"] not in parts:
            ops.setdefault((op["layer"], op["why"]), []).append(op["op"])
    for (layer, why), kinds in ops.items():
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        label = ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items())
        parts[f"{layer or 'the model'} ({label})"] = why
    return parts


# --- the headline -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Remark:
    """A sentence beside the headline: ``level`` "warning" (the run did harm) or "info" (read with care)."""

    level: str
    text: str


@dataclass(frozen=True)
class Headline:
    """What a run achieved, in the order people ask: int8 accuracy (ONNX Runtime's when measured, else the
    run's integer-arithmetic evaluation), the FP32 baseline's, size, speed. ``missing``: for each number
    not measured yet ("int8 in ONNX Runtime", "size", "latency"), why and where to measure it."""

    fp32_accuracy: float | None
    int8_accuracy: float | None  # ONNX Runtime's, once parity ran
    qat_accuracy: float | None  # the run's own evaluation (integer arithmetic)
    ptq_accuracy: float | None
    size: Size | None
    speedup: float | None  # FP32 latency / int8 latency, ORT median
    quantized_layers: int | None = None
    speedup_setting: str = ""  # "batch 1, 1 thread"
    noisy: str | None = None  # why the timing is not to be trusted, when it is not
    missing: dict[str, str] = field(default_factory=dict)
    remarks: list[Remark] = field(default_factory=list)

    def accuracy_text(self) -> str:
        fp32 = f" (FP32 {pct(self.fp32_accuracy)})" if self.fp32_accuracy is not None else ""
        if self.int8_accuracy is not None:
            return f"int8 in ONNX Runtime: {pct(self.int8_accuracy)}{fp32}"
        if self.qat_accuracy is not None:
            fp32 = f", FP32 {pct(self.fp32_accuracy)}" if self.fp32_accuracy is not None else ""
            return (f"int8 in ONNX Runtime: {self.missing['int8']} (evaluated with integer arithmetic: "
                    f"{pct(self.qat_accuracy)}{fp32})")
        return f"accuracy: {self.missing.get('accuracy', 'not measured')}"

    def size_text(self) -> str:
        return self.size.ratio_text() if self.size is not None else f"size: {self.missing['size']}"

    def speed_value(self) -> str | None:
        """int8 against FP32 in ONNX Runtime: "1.9× faster" / "1.3× slower"; None before a benchmark."""
        if self.speedup is None:
            return None
        word = "faster" if self.speedup >= 1 else "slower"
        return f"{self.speedup if self.speedup >= 1 else 1 / self.speedup:.1f}× {word}"

    def speed_text(self) -> str:
        if self.speedup is None:
            return f"latency: {self.missing['latency']}"
        return f"{self.speed_value()} on this CPU" + (" (noisy timing)" if self.noisy else "")

    def warnings(self) -> list[Remark]:
        """The remarks and the noisy-timing warning: what every place showing the headline shows under it."""
        return self.remarks + ([Remark("warning", self.noisy)] if self.noisy else [])

    def to_dict(self) -> dict[str, Any]:
        """The headline as JSON-ready data (``qat-studio show --json``): numbers as measured, sizes in bytes."""
        size = None if self.size is None else {
            "int8_bytes": self.size.int8_bytes, "fp32_bytes": self.size.fp32_bytes, "measured": self.size.measured,
            "file": self.size.label, "times_smaller": self.size.ratio, "bit_packed_bytes": self.size.packed_bytes}
        return {"text": self.text(), "fp32_accuracy": self.fp32_accuracy, "int8_ort_accuracy": self.int8_accuracy,
                "qat_accuracy": self.qat_accuracy, "ptq_accuracy": self.ptq_accuracy, "size": size,
                "quantized_layers": self.quantized_layers, "speedup": self.speedup, "speedup_at": self.speedup_setting,
                "noisy_timing": self.noisy, "not_measured": self.missing,
                "remarks": [{"level": r.level, "text": r.text} for r in self.remarks]}

    def text(self) -> str:
        """"int8 in ONNX Runtime: 99.56% (FP32 99.56%) · 3.0× smaller file · 1.9× faster on this CPU"."""
        return " · ".join((self.accuracy_text(), self.size_text(), self.speed_text()))


def _accuracy(metrics: dict[str, Any], stage: str) -> float | None:
    section = metrics.get(stage)
    return section.get("accuracy") if isinstance(section, dict) else None


def noisy_timing(bench: dict[str, Any] | None, batch: int | None = None, threads: Any = None) -> str | None:
    """Why a benchmark's timing is noisy (an ONNX Runtime backend's p99 over ``NOISY_P99_OVER_MEDIAN``× its
    median, at ``batch``/``threads`` when given), else None."""
    worst = None
    for row in (bench or {}).get("rows", []):
        if not str(row.get("backend", "")).startswith("ort_") or row.get("median_ms", 0) <= 0:
            continue
        if (batch is not None and row.get("batch") != batch) or (threads is not None and row.get("threads") != threads):
            continue
        spread = row["p99_ms"] / row["median_ms"]
        if spread > NOISY_P99_OVER_MEDIAN and (worst is None or spread > worst[0]):
            worst = (spread, row)
    if worst is None:
        return None
    spread, row = worst
    return (f"noisy timing: p99 is {spread:.0f}× the median ({row['p99_ms']:.3g} ms vs {row['median_ms']:.3g} ms, "
            f"{row['backend'].removeprefix('ort_')} at batch {row['batch']}); other work shared the CPU. "
            "Benchmark again on an idle machine before quoting the speed-up")


def remarks(metrics: dict[str, Any], config: dict[str, Any] | None = None) -> list[Remark]:
    """What the accuracies alone would mislead about: a fine-tune its guard stopped or rolled back
    (:func:`guard_text`, a warning), a fine-tune that lost more than ``LOSS_TOLERANCE`` to its PTQ start (a warning), and a QAT accuracy more than ``GAIN_TOLERANCE`` above an FP32 baseline that
    the fine-tune simply trained further (not a gain from int8)."""
    config = config or {}
    fp32, ptq, qat = (_accuracy(metrics, s) for s in ("fp32", "ptq", "qat"))
    out = []
    guarded = guard_text(metrics.get("guard"))
    if guarded:
        out.append(Remark("warning", guarded))
    if ptq is not None and qat is not None and ptq - qat > LOSS_TOLERANCE:
        lr = (config.get("finetune") or {}).get("lr")
        out.append(Remark("warning", f"The fine-tune lost {(ptq - qat) * 100:.2f} points against its PTQ start "
                                     f"({pct(ptq)} → {pct(qat)}): keep the PTQ model, or try a lower learning rate"
                                     + (f" than {lr:g}" if lr else "") + " or fewer epochs."))
    if undertrained_baseline(metrics):
        epochs = (config.get("baseline") or {}).get("epochs")
        trained = f"trained {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "was trained briefly"
        out.append(Remark("info", f"QAT scores {(qat - fp32) * 100:.2f} points above the FP32 baseline, which "
                                  f"{trained}: the comparison is to that baseline, and the fine-tune kept training "
                                  "it. This is not a gain from int8: train the baseline longer for a fair comparison."))
    return out


def guard_text(guard: dict[str, Any] | None) -> str | None:
    """What a fine-tune's guard (``train.Guard``, ``metrics["guard"]``) did, with advice; None when it kept the
    fine-tune's end (or the run had no guard)."""
    if not guard or guard.get("action") not in ("stopped", "rolled_back"):
        return None
    step = guard.get("kept_step") or 0
    kept = "the PTQ start" if step == 0 else f"its best point, step {step} of {guard['total']}"
    if guard.get("kept_val_accuracy") is not None:
        kept += f" (validation accuracy {pct(guard['kept_val_accuracy'])})"
    lr = guard["lr"]
    advice = f"try a lower learning rate ({lr / 10:.2g}; it was {lr:g})"
    if guard["action"] == "stopped":
        peak = guard.get("peak_loss")
        rose = f"rose to {peak:.3g}" if peak is not None else "became infinite or not a number"
        return (f"The fine-tune's loss {rose} from {guard['start_loss']:.3g} at its start, so it was stopped at step "
                f"{guard['stopped_step']} of {guard['total']} and rolled back to {kept}: {advice}.")
    start, end = guard["start_val_loss"], guard["end_val_loss"]
    loss = f"loss {start:.3g} → {end:.3g}" if end is not None else "its loss became infinite or not a number"
    return (f"The fine-tune made the held-out validation split worse (accuracy {pct(guard['start_val_accuracy'])} → "
            f"{pct(guard['end_val_accuracy'])}, {loss}), so it was rolled back to {kept}: {advice} or fewer epochs.")


def undertrained_baseline(metrics: dict[str, Any]) -> bool:
    """True when QAT beats the FP32 baseline by more than ``GAIN_TOLERANCE``: don't colour that as a gain."""
    fp32, qat = _accuracy(metrics, "fp32"), _accuracy(metrics, "qat")
    return fp32 is not None and qat is not None and qat - fp32 > GAIN_TOLERANCE


def headline(metrics: dict[str, Any], config: dict[str, Any] | None = None, bench: dict[str, Any] | None = None,
             rows: list[dict] | None = None, plan: LayerPlan | None = None) -> Headline:
    """A run's headline from its ``metrics`` (``store.get(id)["metrics"]``), ``config`` (the record's dict, for
    the remarks) and bench result (``store.read_result(id, "bench")``, for the noisy-timing check);
    ``rows``/``plan`` only for runs saved before size predictions were."""
    missing = {}
    parity = metrics.get("parity") or {}
    if "accuracy" not in parity:
        missing["int8"] = f"not measured yet — {BENCHMARK_PAGE}"
    if "qat" not in metrics:
        missing["accuracy"] = "not measured yet — the run has not finished"
    size = run_size(metrics, rows, plan)
    if size is None:
        missing["size"] = "not known yet — the run has not finished"
    bench_metrics = metrics.get("bench") or {}
    speedup = bench_metrics.get("speedup")
    setting, noisy = "", None
    if speedup is None:
        missing["latency"] = f"not benchmarked yet — {BENCHMARK_PAGE}"
    else:
        threads = bench_metrics.get("threads")
        setting = f"batch {bench_metrics.get('batch')}, {threads} thread{'s' if threads != 1 else ''}"
        noisy = noisy_timing(bench, bench_metrics.get("batch"), threads)
    return Headline(_accuracy(metrics, "fp32"), parity.get("accuracy"), _accuracy(metrics, "qat"),
                    _accuracy(metrics, "ptq"), size, speedup, run_quantized_layers(metrics, rows, plan), setting, noisy,
                    missing, remarks(metrics, config))
