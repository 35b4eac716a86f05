"""What the export layer shares without heavy imports: its error class and the choices ``rtrt export`` offers."""
from __future__ import annotations

from rtrt.runtime.errors import RtrtError

__all__ = ["ExportError", "BACKEND_CHOICES", "INT8_METHODS", "VLM_TOLERANCE"]

BACKEND_CHOICES = ("onnx", "trt", "both")  # rtrt export --backend: ONNX graphs only, or also TensorRT engines
INT8_METHODS = ("dynamic", "static")  # ORT int8 for CPUs (rtrt.export.quantize): weights only, or Q/DQ calibrated
VLM_TOLERANCE = 1e-3  # rtrt export --vlm: max abs error of every fp32 VLM graph output (logits included) vs PyTorch, times max(1, max |output|)


class ExportError(RtrtError):
    """An export step failed: tracing, a forbidden ONNX construct, parity, quantisation, a build."""
