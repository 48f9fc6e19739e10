"""int8 for CPU serving: ONNX Runtime static quantization, an accuracy check, and a suitability report.

Why ONNX Runtime: on CPUs it runs a QDQ-quantized model with int8 convolution and matmul kernels
(MLAS; VNNI/AMX when the CPU has them, AVX2 otherwise), which on a ResNet-50 served 2-5x the images/s
of eager fp32 PyTorch on the machines measured (benchmarks/bench_predict.py). PyTorch-native int8 was
measured too: FX graph-mode quantization (`torch.ao.quantization.quantize_fx`, x86 backend) was slower
than ORT int8 and is deprecated upstream; PT2E + X86InductorQuantizer now lives in torchao and needs
torch.compile (minutes of compilation per model on a small CPU). Neither is kept; see NOTES-issue18.md.

Choices, following ORT's guidance for CPUs (`quantize_static` docstring):
- QDQ format (QuantizeLinear/DequantizeLinear pairs around float ops; ORT fuses them into int8
  kernels), per-channel int8 weights, uint8 activations from MinMax calibration. Measured on a fine-tuned
  EfficientNet-Lite0 and a trained ResNet-18 (benchmarks/RESULTS.md, predict, "int8 settings"): Entropy and
  Percentile calibration lost the same top-1 (within half a point) and agreed with fp32 no more often; per-tensor
  weights cost Lite0 5 points; 64 calibration images lost no more top-1 than 256 (agreement fell by a point).
- Full 8-bit weights on every CPU. `reduce_range` (7-bit weights) guards against int16 saturation in the
  u8*s8 instruction sequence (vpmaddubsw) of x86 CPUs without VNNI, but ORT's guidance is that saturation rarely
  matters, and 7 bits cost real accuracy: on EfficientNet-Lite0 fine-tuned from ImageNet weights (12 classes of
  photographs, 240 test images) 7-bit weights lost 2.1 top-1 points against fp32 and agreed with it on 89% of
  the images; 8 bits lost 0.8 points and agreed on 97% (per-channel; per-tensor weights lost 9-12 points).
  `reduce_range=True` stays available; the accuracy guard measures whichever is used.
- `quant_pre_process` first (shape inference and ORT's graph optimizations such as folding
  BatchNorm into Conv), so calibration sees the graph that runs and MatMul/Conv get quantized.

A quantized model is only useful with its accuracy known, so this module also evaluates top-1 of an
ONNX file on labelled batches, compares fp32 and int8 in one pass, and refuses a drop above a bound. Before
refusing, it keeps in fp32 the few nodes around the activations int8 represents worst (`keep_fp32_fallback`):
a handful of outlier-stretched tensors usually cost most of a drop, and the rest of the graph keeps its int8
kernels.
Architectures whose compute does not map to int8 kernels are reported by `int8_suitability`:
depthwise convolutions (MobileNet, EfficientNet, ConvNeXt: memory-bound, little to gain, and
sensitive to quantization) and operators that stay float between quantize/dequantize pairs
(LayerNorm, GELU, SiLU/HardSwish), whose share of the work bounds the speed-up.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import first_line, flag_name, option_name

PathLike = Union[str, os.PathLike]
Batch = Any              # a (B,3,H,W) tensor/array, or an (inputs, labels) pair as a DataLoader yields
CALIBRATION_IMAGES = 512
DEPTHWISE_WARN_SHARE = 0.5          # of spatial convs: MobileNet/EfficientNet/ConvNeXt > 80%, ResNet/VGG/RegNet 0
FLOAT_ISLAND_WARN = 4               # float-only nonlinear ops (LayerNorm, GELU, SiLU...) worth a warning
_MAC_OPS = ("Conv", "MatMul", "Gemm")
# Ops with no int8 kernel in ORT's CPU provider: they run in fp32 between dequantize and quantize.
# (Softmax is not one: ORT runs QLinearSoftmax.)
_FLOAT_ISLANDS = {"LayerNormalization": "LayerNorm", "Gelu": "GELU", "Erf": "GELU (erf)", "HardSwish": "HardSwish",
                  "HardSigmoid": "HardSigmoid", "Sigmoid": "Sigmoid/SiLU", "Tanh": "Tanh"}
# In ORT's QDQ registry but without an int8 CPU kernel: quantizing them only rounds their weights (and
# makes ORT warn about a per-channel axis for 1-D gamma); their neighbours' Q/DQ pairs stay either way.
_NO_INT8_KERNEL = {"LayerNormalization", "InstanceNormalization", "BatchNormalization"}
_DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Concat",
                  "Split", "Shape", "Constant", "Identity", "Cast", "Expand", "ConstantOfShape", "Range"}


class QuantizationError(RuntimeError):
    """The int8 model lost more top-1 than allowed, or quantization itself failed."""


# --- hardware ---------------------------------------------------------------------------------------

def cpu_int8_flags() -> dict:
    """Which int8 dot-product instructions this CPU has (Linux /proc/cpuinfo; elsewhere unknown = False):
    VNNI (avx512_vnni / avx_vnni) and AMX decide how fast int8 runs (recorded with each int8 file)."""
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    machine = platform.machine().lower()
    return {"machine": machine, "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "amx": "amx_int8" in flags,
            "arm": machine.startswith(("arm", "aarch64")), "dotprod": "asimddp" in flags}


# --- batches ----------------------------------------------------------------------------------------

def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _inputs(batch: Batch) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def iter_images(batches: Iterable[Batch], max_images: Optional[int]) -> Iterator[np.ndarray]:
    """The input arrays of `batches`, the last one cut so that at most `max_images` images are used."""
    seen = 0
    for batch in batches:
        x = _as_numpy(_inputs(batch))
        if max_images is not None:
            x = x[:max_images - seen]
        if len(x):
            yield x
            seen += len(x)
        if max_images is not None and seen >= max_images:
            return


class BatchReader:
    """ORT's CalibrationDataReader over an iterable of preprocessed batches (tensors, arrays or
    (inputs, labels) pairs), up to `max_images` images; counts what it fed."""

    def __init__(self, batches: Iterable[Batch], input_name: str, max_images: Optional[int] = CALIBRATION_IMAGES):
        self._it = iter_images(batches, max_images)
        self.input_name, self.images = input_name, 0

    def get_next(self) -> Optional[dict]:
        x = next(self._it, None)
        if x is None:
            return None
        self.images += len(x)
        return {self.input_name: x}

    def __iter__(self) -> "BatchReader":
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


# --- sessions and accuracy --------------------------------------------------------------------------

def onnx_session(path: PathLike, threads: Optional[int] = None) -> Any:
    """A CPU onnxruntime session with all graph optimizations; `threads` intra-op threads (default:
    ORT's, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _logits(session: Any, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def onnx_top1(path: PathLike, batches: Iterable[tuple], threads: Optional[int] = None) -> float:
    """Top-1 accuracy (fraction) of the ONNX model at `path` on labelled (inputs, labels) batches."""
    return compare_onnx([path], batches, threads)["top1"][0]


def compare_onnx(paths: Sequence[PathLike], batches: Iterable[tuple], threads: Optional[int] = None) -> dict:
    """Run several ONNX models on the same labelled batches in one pass (decode once):
    {"top1": [per model], "agreement": [share of images whose top-1 class equals the first model's],
    "images": n}."""
    sessions = [onnx_session(p, threads) for p in paths]
    correct = np.zeros(len(paths))
    agree = np.zeros(len(paths))
    n = 0
    for x, y in batches:
        xs, ys = _as_numpy(x), np.asarray(y.cpu() if hasattr(y, "cpu") else y)
        preds = [_logits(s, xs).argmax(1) for s in sessions]
        correct += [(p == ys).sum() for p in preds]
        agree += [(p == preds[0]).sum() for p in preds]
        n += len(ys)
    if n == 0:
        raise ValueError("no labelled images to evaluate on")
    return {"top1": (correct / n).tolist(), "agreement": (agree / n).tolist(), "images": n}


def check_accuracy_drop(top1_fp32: float, top1_int8: float, max_drop_points: float, force: bool = False) -> float:
    """The drop in percentage points; QuantizationError naming both numbers when it exceeds
    `max_drop_points` (unless `force`). Compared as printed, to 1e-9 points: top-1 fractions are counts over the
    split, so 0.995 - 0.985 is 1.0000000000000009 points in floating point, and a drop of exactly the bound is
    within it."""
    drop = 100.0 * (top1_fp32 - top1_int8)
    if _exceeds(drop, max_drop_points) and not force:
        raise QuantizationError(f"int8 top-1 {100 * top1_int8:.2f}% vs fp32 {100 * top1_fp32:.2f}%: a drop of "
                                f"{drop:.2f} points, more than the allowed {max_drop_points:g} "
                                f"({option_name('max_accuracy_drop').strip()}); pass {flag_name('force')} to keep "
                                "it anyway")
    return drop


def _exceeds(drop_points: float, max_drop_points: float) -> bool:
    """Whether a drop is over the bound, compared as printed (to 1e-9 points; see check_accuracy_drop)."""
    return drop_points > max_drop_points + 1e-9


# --- graph analysis ---------------------------------------------------------------------------------

def _shapes(model: Any) -> dict[str, list]:
    """Static dims of every tensor with inferred shape info (symbolic dims -> None)."""
    out = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_sample(dims: Optional[list]) -> Optional[int]:
    """Product of all but the (batch) first dim; None when unknown."""
    if not dims or any(d is None for d in dims[1:]):
        return None
    return int(np.prod(dims[1:])) if len(dims) > 1 else 1


def node_macs(model: Any) -> dict[str, tuple[str, int, bool, bool]]:
    """{node name: (op, multiply-accumulates per image or 0 when shapes are unknown, is depthwise, has a
    spatial kernel (> 1x1))} for every Conv/MatMul/Gemm; the batch is the first dim."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes = {**_shapes(model), **inits}
    res = {}
    for node in model.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        macs, depthwise, spatial = None, False, False
        if node.op_type == "Conv" and node.input[1] in shapes:
            w = shapes[node.input[1]]                     # (Cout, Cin/groups, kh, kw)
            group = int(_attr(node, "group", 1))
            depthwise = group > 1 and group == w[0] and w[1] == 1
            spatial = any(k is None or k > 1 for k in w[2:])
            out = _per_sample(shapes.get(node.output[0]))
            if out is not None:
                macs = out * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b and all(d is not None for d in b):
                k = a[-1] if node.op_type == "MatMul" or not _attr(node, "transA", 0) else a[-2]
                n_out = b[-1] if node.op_type == "MatMul" or not _attr(node, "transB", 0) else b[0]
                rows = _per_sample(a[:-1] + [1]) if len(a) > 2 else 1
                if k is not None and rows is not None:
                    macs = rows * int(k) * int(n_out)
        res[node.name] = (node.op_type, int(macs or 0), depthwise, spatial)
    return res


def int8_suitability(fp32_model: Union[PathLike, Any]) -> dict:
    """How much of an fp32 ONNX graph int8 kernels can take, before quantizing: convolutions and how
    many are depthwise (with their share of conv MACs), matmuls, and the float-only nonlinear ops
    (LayerNorm, GELU, SiLU...) that will sit between dequantize/quantize pairs. `warnings`
    says, in words, when the architecture is unlikely to gain (or likely to lose accuracy)."""
    import onnx

    model = onnx.load(str(fp32_model)) if not hasattr(fp32_model, "graph") else fp32_model
    macs = node_macs(model)
    convs = [m for m in macs.values() if m[0] == "Conv"]
    dw = [m for m in convs if m[2]]
    spatial = [m for m in convs if m[3]]
    conv_macs = sum(m[1] for m in convs)
    total = sum(m[1] for m in macs.values())
    islands = Counter(_FLOAT_ISLANDS[n.op_type] for n in model.graph.node if n.op_type in _FLOAT_ISLANDS)
    report = {"convs": len(convs), "spatial_convs": len(spatial), "depthwise_convs": len(dw),
              "depthwise_mac_share": (sum(m[1] for m in dw) / conv_macs) if conv_macs else 0.0,
              "matmuls": sum(m[0] in ("MatMul", "Gemm") for m in macs.values()), "macs_per_image": total,
              "float_islands": dict(islands), "warnings": []}
    if spatial and len(dw) / len(spatial) >= DEPTHWISE_WARN_SHARE:
        report["warnings"].append(
            f"depthwise-heavy: {len(dw)} of the {len(spatial)} spatial (k > 1) convolutions are depthwise "
            f"({100 * report['depthwise_mac_share']:.0f}% of conv MACs); they are memory-bound, gain little "
            "from int8 and are sensitive to it (MobileNet/EfficientNet-style): the speed-up is smaller than a "
            "dense CNN's (benchmarks/RESULTS.md, predict) and the accuracy drop needs checking")
    n_islands = sum(islands.values())
    if n_islands >= FLOAT_ISLAND_WARN:
        listed = ", ".join(f"{n} {k}" for k, n in islands.most_common())
        report["warnings"].append(
            f"{n_islands} float-only ops stay fp32 between quantize/dequantize pairs ({listed}); "
            "LayerNorm/GELU (ViT-style) bound the speed-up, and outliers in their inputs cost accuracy")
    return report


_INT8_KERNEL_PREFIXES = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "QAttention", "DynamicQuantize",
                         "QEmbedLayerNormalization", "QOrderedMatMul")
_DTYPE_PRESERVING = _DATA_MOVEMENT | {"MaxPool", "NhwcMaxPool", "Relu", "Clip", "Pad", "Resize"}


def _quantized_output(node: Any) -> bool:
    """Whether an int8 kernel's output is still quantized (QGemm without y_scale outputs float)."""
    if node.op_type == "QGemm":
        return len(node.input) > 7 and bool(node.input[7])
    return node.op_type.startswith(_INT8_KERNEL_PREFIXES) and not node.op_type.startswith("DynamicQuantize")


def runtime_ops(model_path: PathLike) -> dict:
    """What ONNX Runtime actually runs for a QDQ model: the op types of the graph its CPU provider builds
    (ORT_ENABLE_EXTENDED, where QDQ groups are fused into QLinearConv, QGemm, QLinearAdd ...), split
    into int8 ops (int8 kernels, and pooling/data movement on uint8 tensors) and fp32 compute ops, plus
    the DequantizeLinear nodes left (each an int8 -> fp32 hop)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="spinal-ort-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.intra_op_num_threads = 1
        ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    quantized: set = set()
    int8, fp32 = Counter(), Counter()
    dq = 0
    for node in graph.node:                       # topological order
        op = node.op_type
        if op == "QuantizeLinear":
            quantized.update(node.output)
        elif op == "DequantizeLinear":
            dq += 1
        elif op.startswith(_INT8_KERNEL_PREFIXES):
            int8[op] += 1
            if _quantized_output(node):
                quantized.update(node.output)
        elif node.input and node.input[0] in quantized and op in _DTYPE_PRESERVING:
            quantized.update(node.output)
            if op not in _DATA_MOVEMENT:
                int8[op] += 1
        elif op not in _DATA_MOVEMENT:
            fp32[op] += 1
    return {"int8": dict(int8), "fp32": dict(fp32), "dequantize": dq}


# --- quantization -----------------------------------------------------------------------------------

def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if name not in methods:
        raise ValueError(f"calibrate_method must be one of {list(methods)}, got {name!r}")
    return methods[name]


def _preprocess(src: Path, dst: Path) -> Optional[str]:
    """quant_pre_process (symbolic shape inference + ORT graph optimizations: BatchNorm folded into Conv,
    constant folding) into `dst`; None on success, else why it was skipped (quantization then works on
    the original graph)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    big = src.stat().st_size + sum(f.stat().st_size for f in src.parent.glob(src.name + ".data")) > 1.8 * 2**30
    try:
        quant_pre_process(str(src), str(dst), save_as_external_data=big, all_tensors_to_one_file=True)
        return None
    except Exception as e:            # shape inference fails on some exotic graphs; quantization can go on
        return f"{type(e).__name__}: {first_line(e)}"


def quantize_onnx(fp32_path: PathLike, out_path: PathLike, calibration_batches: Iterable[Batch], *,
                  max_images: int = CALIBRATION_IMAGES, per_channel: bool = True,
                  reduce_range: bool = False, calibrate_method: str = "minmax",
                  preprocess: bool = True, nodes_to_exclude: Sequence[str] = ()) -> dict:
    """Statically quantize the fp32 ONNX model at `fp32_path` to int8 (QDQ, per-channel int8 weights,
    uint8 activations) into `out_path`, calibrating on up to `max_images` images of
    `calibration_batches` (preprocessed exactly as for evaluation: tensors, arrays or (inputs, labels)).

    Returns what was done: settings, calibration images, seconds, which ops run int8 / stay fp32
    (`runtime_ops`), the fp32 graph's `int8_suitability` and its `warnings`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    flags = cpu_int8_flags()
    start = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        src = fp32_path
        skipped = None
        if preprocess:
            skipped = _preprocess(fp32_path, Path(tmp) / "pre.onnx")
            src = fp32_path if skipped else Path(tmp) / "pre.onnx"
        suitability = int8_suitability(src)
        input_name = onnx_session(src).get_inputs()[0].name
        reader = BatchReader(calibration_batches, input_name, max_images)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(src), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=_calibration_method(calibrate_method),
                        op_types_to_quantize=[op for op in QDQRegistry if op not in _NO_INT8_KERNEL],
                        nodes_to_exclude=list(nodes_to_exclude) or None)
        if reader.images == 0:
            raise QuantizationError("no calibration images: calibration_batches was empty")
        ops = runtime_ops(staged)
        shutil.move(str(staged), str(out_path))
    warnings = list(suitability["warnings"])
    heavy = {k: v for k, v in ops["fp32"].items() if k in _MAC_OPS or k.startswith("Fused")}
    if heavy:
        warnings.append(f"left in fp32 by onnxruntime: {', '.join(f'{n} {k}' for k, n in heavy.items())}")
    if skipped:
        warnings.append(f"quant_pre_process was skipped ({skipped}); quantized the graph as exported")
    if reader.images < 100:
        warnings.append(f"calibrated on only {reader.images} images; a few hundred give steadier ranges")
    return {"file": out_path.name, "format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8",
            "activations": "uint8", "reduce_range": reduce_range, "calibrate_method": calibrate_method,
            "calibration_images": reader.images, "preprocessed": preprocess and not skipped,
            "cpu": {k: v for k, v in flags.items() if k != "machine"}, "seconds": time.perf_counter() - start,
            "int8_ops": ops["int8"], "fp32_ops": ops["fp32"], "dequantize_nodes": ops["dequantize"],
            "suitability": suitability, "warnings": warnings}


# how the guard gets more images when it scores a run's val split (export of another --data folder passes its own)
GUARD_ADVICE = ("export from a run with a bigger val split (more images in val/, or --val-fraction for a folder "
                "without one)")


def quantize_and_check(fp32_path: PathLike, out_path: PathLike, calibration_batches: Iterable[Batch],
                       eval_batches: Iterable[tuple], max_accuracy_drop: float = 1.0, force: bool = False,
                       fallback: bool = True, guard_advice: str = GUARD_ADVICE, **options: Any) -> dict:
    """quantize_onnx, then top-1 of fp32 and int8 on `eval_batches` (labelled, one pass) and the
    guard: QuantizationError with both numbers when int8 loses more than `max_accuracy_drop` points
    (the int8 file is then removed), unless `force`. The export command's building block. `guard_advice`: how
    the caller's guard gets more images, for `coarse_guard_warning` (only the caller knows where they came from).

    With `fallback`, a drop above the bound first tries `keep_fp32_fallback`: the nodes around the
    activations that int8 represents worst stay in fp32 (1, 2, 4, then 8 of them), and the first try within the
    bound is kept, its nodes recorded under "fallback"; when none is, the try that lost least is judged."""
    calibration, evaluation = _reiterable(calibration_batches), _reiterable(eval_batches)
    out_path = Path(out_path)
    info = quantize_and_compare(fp32_path, out_path, calibration, evaluation, **options)
    if fallback and _exceeds(_drop(info), max_accuracy_drop):
        info = keep_fp32_fallback(fp32_path, out_path, calibration, evaluation, info, max_accuracy_drop, **options)
    coarse = coarse_guard_warning(info["eval_images"], max_accuracy_drop, guard_advice)
    if coarse:
        info["warnings"].append(coarse)
    try:
        info["top1_drop_points"] = check_accuracy_drop(info["top1_fp32"], info["top1_int8"], max_accuracy_drop, force)
    except QuantizationError as e:
        out_path.unlink(missing_ok=True)
        tried = info.get("fallback", {}).get("tried")
        raise QuantizationError(f"{e}" + (f" (also after {tried} tries keeping the nodes around the worst-quantized "
                                          "activations in fp32)" if tried else "")
                                + (f"; measured on only {info['eval_images']} images (int8 agrees with fp32 on "
                                   f"{100 * info['agreement']:.1f}% of them)" if coarse else "")) from None
    return info


def coarse_guard_warning(eval_images: int, max_accuracy_drop: float, advice: str = GUARD_ADVICE) -> Optional[str]:
    """A warning when one image of the guard's split is worth more than the allowed drop: on 10 val images a
    1-point bound passes only an int8 model that gets every image fp32 gets right, and one lucky image hides a
    real loss. The agreement with fp32 (printed beside it) is then the steadier sign; `advice` says how to give
    the guard more images, which depends on where they came from."""
    if eval_images <= 0 or 100.0 / eval_images <= max_accuracy_drop:
        return None
    return (f"the accuracy guard measured only {eval_images} images: one image is {100.0 / eval_images:.1f} "
            f"points, more than the allowed {max_accuracy_drop:g}, so the guard is coarse here; judge int8 by its "
            f"agreement with fp32 too, or {advice}")


def _reiterable(batches: Iterable) -> Sequence:
    """Batches that can be read more than once (calibration may run again for the fallback)."""
    return batches if isinstance(batches, Sequence) else list(batches)


def _drop(info: dict) -> float:
    return 100.0 * (info["top1_fp32"] - info["top1_int8"])


def quantize_and_compare(fp32_path: PathLike, out_path: PathLike, calibration: Iterable[Batch],
                         evaluation: Iterable[tuple], **options: Any) -> dict:
    """quantize_onnx's record plus top1_fp32, top1_int8, agreement and eval_images of both files on `evaluation`
    (one pass): one quantization try, unjudged. The guard, the fallback's tries and bench_predict's settings table
    are built on it."""
    info = quantize_onnx(fp32_path, out_path, calibration, **options)
    cmp = compare_onnx([fp32_path, out_path], evaluation)
    info.update(top1_fp32=cmp["top1"][0], top1_int8=cmp["top1"][1], agreement=cmp["agreement"][1],
                eval_images=cmp["images"])
    return info


FALLBACK_TRIES = (1, 2, 4, 8)        # how many of the worst-quantized activations to keep in fp32, in turn
SENSITIVITY_IMAGES = 32              # images the per-activation errors are measured on


def keep_fp32_fallback(fp32_path: PathLike, out_path: Path, calibration: Sequence, evaluation: Sequence,
                       first: dict, max_accuracy_drop: float, **options: Any) -> dict:
    """Re-quantize with the nodes around the worst-quantized activations left in fp32, the fewest that hold the
    drop within `max_accuracy_drop`: ORT's QDQ debugging tools (`activation_sqnr`) rank the activations of the
    int8 model `first` describes (at `out_path`) by how much their own quantize/dequantize pair changes them;
    each try excludes the producer and consumers of the k worst (`nodes_around`), so those tensors stay float.
    Returns the kept try's info (at `out_path`) with "fallback": the activations, their SQNR, the fp32 nodes,
    how many tries ran."""
    ranked = sorted(activation_sqnr(out_path, calibration).items(), key=lambda kv: kv[1])
    best, tries = first, 0
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".fallback-") as tmp:
        for k in [k for k in FALLBACK_TRIES if k <= len(ranked)]:
            worst = ranked[:k]
            nodes = nodes_around(out_path, [t for t, _ in worst])      # names as in the graph quantize_onnx reads
            trial_path = Path(tmp) / f"try{k}.onnx"
            trial = quantize_and_compare(fp32_path, trial_path, calibration, evaluation,
                                          nodes_to_exclude=nodes, **options)
            trial["fallback"] = {"activations": {t: round(db, 1) for t, db in worst}, "fp32_nodes": nodes}
            tries += 1
            if _drop(trial) < _drop(best):
                best, best_path = trial, trial_path
            if not _exceeds(_drop(trial), max_accuracy_drop):
                break
        if best is not first:
            shutil.move(str(best_path), str(out_path))
            best["file"] = out_path.name
    best.setdefault("fallback", {})["tried"] = tries
    if best is not first:
        best["warnings"] = [*best["warnings"], f"kept {len(best['fallback']['fp32_nodes'])} node(s) in fp32 around "
                            f"the {len(best['fallback']['activations'])} activation(s) int8 represented worst "
                            f"(SQNR {', '.join(f'{db:g} dB' for db in best['fallback']['activations'].values())}): "
                            f"top-1 drop {_drop(first):.2f} -> {_drop(best):.2f} points"]
    return best


def activation_sqnr(int8_path: PathLike, batches: Iterable[Batch], max_images: int = SENSITIVITY_IMAGES) -> dict:
    """{activation: SQNR in dB} for every activation of a QDQ model, each measured before vs after its own
    QuantizeLinear/DequantizeLinear pair on up to `max_images` images (ORT's `qdq_loss_debug` collects them).
    Low means the int8 grid represents that tensor badly. The SQNR is per channel (axis 1 of NCHW, the last axis
    otherwise), averaged over the channels that carry signal: one outlier channel stretching a per-tensor range
    leaves the whole tensor's SQNR high (its own energy dominates) while the other channels lose everything."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="spinal-qdq-debug-") as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        modify_model_output_intermediate_tensors(str(int8_path), str(augmented))
        reader = BatchReader(batches, onnx_session(int8_path).get_inputs()[0].name, max_images)
        matched = create_activation_matching(collect_activations(str(augmented), reader))
    return {name: channel_sqnr(np.concatenate(m["pre_qdq"]), np.concatenate(m["post_qdq"]))
            for name, m in matched.items()}


def channel_sqnr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over channels with signal of 20 log10(|x_c| / |x_c - y_c|) (channels: axis 1 of 4-D, else last)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.ndim < 2:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    axis = 1 if x.ndim == 4 else x.ndim - 1
    x, y = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1), np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1)
    signal, noise = np.linalg.norm(x, axis=1), np.linalg.norm(x - y, axis=1)
    live = signal > 0
    if not live.any():
        return float("inf")
    eps = np.finfo(np.float32).eps
    return float(np.mean(20 * np.log10(signal[live] / np.maximum(noise[live], eps * signal[live]))))


def nodes_around(int8_path: PathLike, activations: Sequence[str]) -> list[str]:
    """Names of the compute nodes that produce or read (through their QuantizeLinear/DequantizeLinear pair)
    `activations` in a QDQ model: excluded from quantization, they leave those tensors in fp32."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    names: list[str] = []

    def add(node: Any) -> None:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and node.name and node.name not in names:
            names.append(node.name)

    for t in activations:
        if t in producer:
            add(producer[t])
        for q in readers.get(t, []):
            for dq in (readers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else [q]):
                for reader in (readers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else [dq]):
                    add(reader)
    return names
