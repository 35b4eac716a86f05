"""INT8 variants of the exported graphs for CPUs, with ONNX Runtime's quantisation tools.

Two methods, chosen per graph by ``rtrt export`` (``METHODS``):

- ``dynamic``: weights of MatMul (and Gemm) quantised to int8 per output channel ahead of time,
  activations quantised per call from their observed range (``MatMulInteger`` /
  ``DynamicQuantizeLinear``). No calibration data; robust to any input distribution. Used for the
  adapter, whose inputs (a VLM's visual tokens) are not available at export time.
- ``static``: QDQ graph with activation ranges calibrated (MinMax) on real detector inputs;
  ``symmetric=True`` gives the signed, symmetric QDQ form TensorRT accepts for explicit INT8.

Portability: the ORT-CPU variants quantise weights with ``reduce_range`` (7-bit weights). ONNX
Runtime's u8s8 kernels on x86-64 CPUs without VNNI (AVX2 only) multiply with ``vpmaddubsw``, whose
int16 pair sums saturate with full-range weights; its quantisation guide recommends
``reduce_range`` (or u8u8) for them. Measured on an AVX2 CPU without VNNI: the tiny test adapter's
int8 error 0.343 -> 0.024, the demo adapter 0.087 -> 0.007. With 7-bit weights no kernel can
saturate, so a graph that passes parity on one CPU holds on VNNI/AVX-512 machines and on ARM64
too (at a small accuracy cost there). The symmetric QDQ graphs for TensorRT keep full 8-bit
weights: TensorRT's int8 GEMMs accumulate in int32 and do not saturate.

Both first run ``quant_pre_process`` (symbolic shape inference and ORT's graph optimiser), which
ORT recommends before quantising; if that step fails the original graph is quantised. The int8
graph's own parity (max abs error, top-k agreement with fp32) is measured by
``rtrt.export.parity``; this module only writes the file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .common import INT8_METHODS, ExportError

__all__ = ["METHODS", "quantize_dynamic", "quantize_static", "quantize"]

METHODS = INT8_METHODS

# Ops whose weights carry nearly all the FLOPs of both graphs (ViT blocks, projections, adapter).
_OPS = ("MatMul", "Gemm")


@contextlib.contextmanager
def _quiet():
    """ORT's quantiser logs every skipped node and warns about pre-processing; keep the CLI readable."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _preprocess(src: Path, workdir: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / f"{src.stem}.pre.onnx"
    try:
        with _quiet():
            quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
        return out
    except Exception:  # symbolic shape inference cannot always follow dynamo's shape arithmetic
        try:
            with _quiet():
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            return out
        except Exception:
            return src


def quantize_dynamic(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = True) -> Path:
    """Dynamic int8 quantisation of MatMul/Gemm weights; returns ``dst``."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as _qd

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="rtrt-q-") as tmp:
        pre = _preprocess(src, Path(tmp))
        try:
            with _quiet():
                _qd(
                    str(pre),
                    str(dst),
                    op_types_to_quantize=list(_OPS),
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                    reduce_range=True,  # 7-bit weights: no u8s8 saturation on CPUs without VNNI
                    extra_options={"MatMulConstBOnly": True},
                )
        except Exception as e:
            raise ExportError(f"{src.name}: dynamic int8 quantisation failed ({type(e).__name__}: {e})") from e
    return dst


class _Feeds:
    """``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._it = iter([dict(f) for f in feeds])

    def get_next(self):
        return next(self._it, None)


def quantize_static(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    symmetric: bool = False,
    per_channel: bool = True,
) -> Path:
    """Static QDQ int8 quantisation calibrated on ``calibration`` feeds; returns ``dst``.

    ``symmetric=False``: uint8 activations / int8 weights with ``reduce_range`` (7-bit weights), the
    form ONNX Runtime's CPU kernels run on every x86-64 (with or without VNNI) and ARM64.
    ``symmetric=True``: int8 activations and full-range int8 weights, symmetric, the form TensorRT builds.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _qs

    feeds = list(calibration)
    if not feeds:
        raise ExportError(f"{Path(src).name}: static quantisation needs at least one calibration input")
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="rtrt-q-") as tmp:
        pre = _preprocess(src, Path(tmp))
        try:
            with _quiet():
                _qs(
                    str(pre),
                    str(dst),
                    _Feeds(feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(_OPS),
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    reduce_range=not symmetric,  # ORT CPU kernels: see the module docstring
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "MatMulConstBOnly": True},
                )
        except Exception as e:
            raise ExportError(f"{src.name}: static int8 quantisation failed ({type(e).__name__}: {e})") from e
    return dst


def quantize(src, dst, method: str, calibration: Iterable[Mapping[str, np.ndarray]] = ()) -> Path:
    """``quantize_dynamic`` or ``quantize_static`` by name (``METHODS``)."""
    if method == "dynamic":
        return quantize_dynamic(src, dst)
    if method == "static":
        return quantize_static(src, dst, calibration)
    raise ExportError(f"unknown quantisation method {method!r} (choose from {', '.join(METHODS)})")
