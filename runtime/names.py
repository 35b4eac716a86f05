"""Names defined once: ONNX graph inputs/outputs and dynamic axes, artifact file names, backends and precisions.

The exporter, the runtime backends, the TensorRT engine builder and the commands all read these,
so a renamed tensor or file cannot silently disconnect one of them. A bundle's exported files::

    detector.onnx, adapter.onnx             fp32 graphs                          onnx_file(g)
    <graph>.int8.onnx                       ORT int8 for CPUs                    onnx_file(g, "int8")
    <graph>.qdq.onnx                        symmetric Q/DQ int8 for TensorRT     onnx_file(g, "qdq")
    <graph>.fp16.onnx                       fp16 for strongly typed TensorRT     onnx_file(g, "fp16")
    engines/<graph>.<precision>.engine      TensorRT engines                     engine_file(g, p)
    reference.safetensors                   reference inputs/outputs (rtrt check) REFERENCE_FILE

and the keys they are recorded under in ``manifest.exports`` (``rtrt.runtime.exports``):
``graph_key(g, variant)`` in ``onnx.graphs`` ("detector", "detector.int8"), ``engine_name(g, p)``
in ``engines`` ("detector.fp16"). The module imports nothing heavy: commands read the constants
at ``--help`` time.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["display_name", 
    "GraphSpec",
    "ADAPTER",
    "ADAPTER_BIASED",
    "adapter_spec",
    "ADAPTER_CALL",
    "DETECTOR",
    "GRAPHS",
    "SPECS",
    "BACKENDS",
    "VLM_BACKENDS",
    "VLM_PRECISIONS",
    "REFINE_MASK_CLASSES",
    "PRECISIONS",
    "MISMATCH_POLICIES",
    "VARIANTS",
    "REFERENCE_FILE",
    "graph_key",
    "onnx_file",
    "engine_name",
    "engine_file",
    "ort_variant",
    "source_graph",
    "VLM_ONNX_DIR",
    "VLM_CONFIG_FILES",
    "VISION_ENCODER",
    "VISION_ENCODER_REFINED",
    "EMBED_TOKENS",
    "DECODER",
    "VLM_GRAPHS",
    "VLM_VARIANTS",
    "QWEN_VISION_INPUTS",
    "vlm_onnx_file",
    "past_names",
    "VLM_DECODER_INPUTS",
    "VLM_DECODER_OUTPUTS",
    "VLM_EMBED_INPUTS",
    "VLM_EMBED_OUTPUTS",
    "VLM_VISION_OUTPUTS",
    "VLM_REFINE_MASK",
    "VLM_CLASS_BIAS",
    "VLM_TOKENS_PER_ROW",
]


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # tensor name -> {axis index: symbolic dimension name}
    dynamic_axes: dict[str, dict[int, str]]


# Adapter: visual tokens V [B, N, D] attend to class embeddings W [C, D].
ADAPTER = GraphSpec(
    inputs=("visual_tokens", "class_embeddings"),
    outputs=("refined_tokens",),
    dynamic_axes={
        "visual_tokens": {0: "batch", 1: "num_tokens"},
        "class_embeddings": {0: "num_classes"},
        "refined_tokens": {0: "batch", 1: "num_tokens"},
    },
)

# An adapter trained with ``detector_bias`` also takes the detector's z-score of each class at each
# visual token (``rtrt.runtime.refine_mask.token_bias``), added to its attention logits.
ADAPTER_BIASED = GraphSpec(
    inputs=("visual_tokens", "class_embeddings", "class_bias"),
    outputs=("refined_tokens",),
    dynamic_axes={
        "visual_tokens": {0: "batch", 1: "num_tokens"},
        "class_embeddings": {0: "num_classes"},
        "class_bias": {0: "batch", 1: "num_tokens", 2: "num_classes"},
        "refined_tokens": {0: "batch", 1: "num_tokens"},
    },
)


def adapter_spec(adapter) -> GraphSpec:
    """The adapter graph's names for a bundle's ``AdapterConfig`` (``ADAPTER_BIASED`` with ``detector_bias``)."""
    return ADAPTER_BIASED if getattr(adapter, "detector_bias", False) else ADAPTER


# How the adapter is called, the same for the torch, ORT and TensorRT backends: once per VLM
# batch, with ALL visual tokens of every image of the batch concatenated in image-token order,
# as ONE row: ``refine(visual_tokens [1, T_total, D], class_embeddings [C, D] = the bundle's W)``
# (``Pipeline._answer``: ``backend.refine(v[None], W)``). So the graph's ``batch`` is always 1 and
# ``num_tokens`` runs from the fewest tokens one image can give to ``max_batch`` x the most
# tokens one image can give; ``rtrt.runtime.profiles.adapter_ranges`` computes that range from
# the bundle's image-token layout, and TensorRT engines are built for exactly that range.
ADAPTER_CALL = "refine(visual_tokens [1, T_total, D], class_embeddings [C, D]) -> refined_tokens [1, T_total, D]"

# Detector: normalised image [B, 3, H, W] and W [C, D] -> per-class scores [B, C] and the
# per-patch cosine map [B, C, P]. Ranking the C scores is left to the caller (a few dozen
# numbers; ``select_detections``), so the graph holds no integer sort TensorRT must handle.
DETECTOR = GraphSpec(
    inputs=("pixel_values", "class_embeddings"),
    outputs=("scores", "similarity"),
    dynamic_axes={
        "pixel_values": {0: "batch"},
        "class_embeddings": {0: "num_classes"},
        "scores": {0: "batch", 1: "num_classes"},
        "similarity": {0: "batch", 1: "num_classes", 2: "num_patches"},
    },
)


GRAPHS = ("detector", "adapter")  # the exported graphs, in the order rtrt export writes them
SPECS: dict[str, GraphSpec] = {"detector": DETECTOR, "adapter": ADAPTER}  # each graph's names and axes, by graph
BACKENDS = ("torch", "ort", "trt")  # rtrt.runtime.backends.make_backend names
VLM_BACKENDS = ("torch", "ort")  # how the frozen VLM runs: transformers (the reference) or its exported ONNX graphs
VLM_PRECISIONS = ("fp32", "int8")  # the exported VLM's decoder: fp32, or int8 weight-only (decoder_model_merged_quantized)
REFINE_MASK_CLASSES = ("any", "reported", "unhinted")  # whose cells the refinement mask keeps (Pipeline.refine_mask_classes)
PRECISIONS = ("fp32", "fp16", "int8")  # what a backend runs the graphs at
MISMATCH_POLICIES = ("rebuild", "fallback", "fail")  # what the trt backend does with an engine built elsewhere
# Exported variants of a graph beside its fp32 one ("" = fp32): ORT int8 for CPUs, symmetric Q/DQ
# int8 that TensorRT builds int8 engines from, fp16 that strongly typed TensorRT builds fp16 from.
VARIANTS = ("", "int8", "qdq", "fp16")
REFERENCE_FILE = "reference.safetensors"  # reference feeds and PyTorch outputs that rtrt check reruns


def graph_key(graph: str, variant: str = "") -> str:
    """Key of an exported graph in ``manifest.exports.onnx.graphs``: ``detector``, ``detector.int8``."""
    if graph not in GRAPHS or variant not in VARIANTS:
        raise ValueError(f"no exported graph {graph!r} variant {variant!r}")
    return f"{graph}.{variant}" if variant else graph


def onnx_file(graph: str, variant: str = "") -> str:
    """Bundle file of an exported graph: ``detector.onnx``, ``adapter.qdq.onnx``."""
    return graph_key(graph, variant) + ".onnx"


def engine_name(graph: str, precision: str) -> str:
    """Key of a TensorRT engine in ``manifest.exports.engines``: ``detector.fp16``."""
    if graph not in GRAPHS or precision not in PRECISIONS:
        raise ValueError(f"no engine for graph {graph!r} at precision {precision!r}")
    return f"{graph}.{precision}"


def engine_file(graph: str, precision: str) -> str:
    """Bundle file of a TensorRT engine: ``engines/detector.fp16.engine``."""
    return f"engines/{engine_name(graph, precision)}.engine"


def ort_variant(precision: str) -> str:
    """The graph variant ONNX Runtime runs for ``precision``: int8 graphs for int8, else the fp32
    graph (fp16 on ORT is the TensorRT execution provider's flag over the fp32 graph)."""
    return "int8" if precision == "int8" else ""


def source_graph(graph: str, precision: str, strongly_typed: bool) -> str:
    """Key of the exported graph a TensorRT engine of ``precision`` is built from: int8 from the Q/DQ
    graph, fp16 from the fp16 graph where TensorRT is strongly typed (>= 11), else the fp32 graph."""
    variant = "qdq" if precision == "int8" else "fp16" if precision == "fp16" and strongly_typed else ""
    return graph_key(graph, variant)


def display_name(name: str) -> str:
    """How a class name is written in a prompt and shown to people: ``traffic_cone`` -> ``traffic cone``."""
    return name.replace("_", " ").strip()


# ---------------------------------------------------------------------------------------------
# The whole VLM in ONNX (``rtrt export --vlm``), in the onnx-community / transformers.js layout, so
# a third-party runtime that reads those exports can load ours: the bundle folder ``VLM_ONNX_DIR``
# is laid out as an onnx-community model repository, the VLM's own configs at its top (config.json,
# generation_config.json, tokenizer.json, tokenizer_config.json, chat template, processor configs:
# ``VLM_CONFIG_FILES``) and the graphs in its ``onnx/`` folder. The typed record is
# ``manifest.exports.vlm`` (``rtrt.runtime.exports``). The torch-free runtime reads only this folder.
#
#   vlm_onnx/onnx/vision_encoder.onnx            stock vision tower + projector       -> image_features
#   vlm_onnx/onnx/vision_encoder_refined.onnx    the same + the adapter, W a constant -> refined image_features
#   vlm_onnx/onnx/embed_tokens.onnx              input_ids int64 [B, S] -> inputs_embeds [B, S, D]
#   vlm_onnx/onnx/decoder_model_merged.onnx      one graph for prefill (past length 0) and decode steps
#   vlm_onnx/onnx/decoder_model_merged_quantized.onnx   int8 weight-only decoder for CPUs (onnx-community's suffix)
#
# Decoder (the language model + LM head), every tensor float32 unless said:
#   inputs  inputs_embeds [B, S, D]; attention_mask int64 [B, P+S] (1 real, 0 left padding);
#           position_ids int64 [B, S] (Qwen2.5-VL: [3, B, S], its M-RoPE rows);
#           past_key_values.{i}.key / .value [B, kv_heads, P, head_dim] for i in range(layers)
#   outputs logits [B, S, vocab]; present.{i}.key / .value [B, kv_heads, P+S, head_dim]
# Vision encoders: input ``pixel_values`` as the family's processor makes it (LLaVA [N, 3, H, W];
# InternVL tiles [N, 3, H, W]; Qwen2.5-VL flattened patches [patches, C*t*p*p] plus the
# grid-dependent index inputs in ``QWEN_VISION_INPUTS``, computed by the runtime in numpy), output
# ``image_features`` with every image's visual tokens in image-token order, [T_total, D].
# A graph over 2 GB keeps its weights beside it in ``<file>_data`` (ONNX external data).
VLM_ONNX_DIR = "vlm_onnx"
VLM_CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
)  # copied when the VLM has them
VISION_ENCODER = "vision_encoder"
VISION_ENCODER_REFINED = "vision_encoder_refined"
EMBED_TOKENS = "embed_tokens"
DECODER = "decoder_model_merged"
VLM_GRAPHS = (VISION_ENCODER, VISION_ENCODER_REFINED, EMBED_TOKENS, DECODER)
VLM_VARIANTS = ("", "quantized")  # "" fp32; "quantized": int8 weight-only (decoder only)
# Qwen2.5-VL's vision encoder takes, beside pixel_values, what the stock tower computes from
# image_grid_thw in Python loops (so the graph stays free of data-dependent control flow).
QWEN_VISION_INPUTS = ("pixel_values", "rotary_pos_ids", "window_index", "cu_seqlens", "cu_window_seqlens")


def vlm_onnx_file(graph: str, variant: str = "") -> str:
    """Bundle file of an exported VLM graph: ``vlm_onnx/onnx/decoder_model_merged_quantized.onnx``."""
    if graph not in VLM_GRAPHS or variant not in VLM_VARIANTS:
        raise ValueError(f"no exported VLM graph {graph!r} variant {variant!r}")
    return f"{VLM_ONNX_DIR}/onnx/{graph}{'_' + variant if variant else ''}.onnx"


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """Decoder cache tensor names: (``past_key_values.{i}.key/.value`` inputs, ``present.{i}.key/.value`` outputs)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


# Tensor names of the VLM graphs (the table above, as constants for the exporter and the runtime).
VLM_DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")  # then past_names(layers)[0]
VLM_DECODER_OUTPUTS = ("logits",)  # then past_names(layers)[1]
VLM_EMBED_INPUTS = ("input_ids",)  # embed_tokens
VLM_EMBED_OUTPUTS = ("inputs_embeds",)
VLM_VISION_OUTPUTS = ("image_features",)  # vision_encoder and vision_encoder_refined (inputs: the family's pixel inputs)
# LLaVA's and InternVL's vision_encoder_refined also takes ``refine_mask`` float32 [T_total]: a token
# whose value is 0 keeps the stock encoder's output exactly, the others are refined (all ones: the
# paper's refinement). Bundles exported before it have no such input: they refine every token or re-export.
VLM_REFINE_MASK = "refine_mask"
# An adapter trained with ``detector_bias``: its refined encoder also takes ``class_bias`` [T_total, C],
# the detector's z-scores at each visual token (``refine_mask.token_bias``); LLaVA only.
VLM_CLASS_BIAS = "class_bias"
VLM_TOKENS_PER_ROW = "rtrt.tokens_per_row"  # that graph's metadata: visual tokens per pixel_values row (image or tile)
