"""The whole VLM in ONNX (``rtrt export --vlm``): a bundle's frozen VLM as onnx-community graphs, checked against PyTorch.

``export_vlm(family, out_dir, source=...)`` writes, under ``out_dir``, the bundle files that
``rtrt.runtime.names`` defines (section "The whole VLM in ONNX")::

    vlm_onnx/config.json, tokenizer.json, ...            the VLM's own configs (the VLM_CONFIG_FILES it has)
    vlm_onnx/onnx/vision_encoder.onnx                    tower + projector -> image_features [T_total, D]
    vlm_onnx/onnx/vision_encoder_refined.onnx            the same + the bundle's adapter, W a constant (+ refine_mask)
    vlm_onnx/onnx/embed_tokens.onnx                      input_ids -> inputs_embeds
    vlm_onnx/onnx/decoder_model_merged.onnx              language model + LM head with a KV cache
    vlm_onnx/onnx/decoder_model_merged_quantized.onnx    (quantized=True) int8 weight-only decoder for CPUs

How each graph is made (torch's dynamo exporter at ``OPSET``; a graph whose weights pass
``EXTERNAL_DATA_BYTES`` keeps them in ``<file>_data`` beside it):

- decoder: ``DecoderGraph`` takes flat tensors and builds transformers' ``DynamicCache`` from the
  past inside, so one graph serves the prefill (past length 0) and every decode step (S = 1).
  torch.export refuses an example dimension of 0 or 1, so the example has batch 3, 5 new tokens
  and a past of 7; past length 0 runs in every parity check (each prefill starts from it).
  Qwen2.5-VL's text model gets its three M-RoPE rows [3, B, S] as they are: the [4, B, S] form
  ``generate`` builds only adds a text row, which picks the attention mask when none is given.
- vision encoders: LLaVA's is the tower's hidden state at ``vision_feature_layer`` (CLS dropped by
  the "default" strategy) through the projector, what ``get_image_features`` computes without
  splitting the batch into a Python list; InternVL's is its ``get_image_features`` as it is;
  Qwen2.5-VL's comes from ``rtrt.export.vlm_onnx_qwen``. Every image's tokens in image-token order,
  [T_total, D], as ``VLMFamily.visual_tokens`` gives them.
- refined encoder: the stock one followed by ``adapter(image_features[None], W)[0]``: every token of
  the batch as one row, as ``Pipeline`` refines them (``names.ADAPTER_CALL``). LLaVA's and InternVL's
  also take ``refine_mask`` [T_total] (``names.VLM_REFINE_MASK``; its length a derived dynamic dim, the
  images or tiles times the tokens each gives, written into the graph's metadata as
  ``rtrt.tokens_per_row``): where it is 0 the stock token comes out unchanged (``Pipeline.refine_mask_z``).
- quantized decoder: ONNX Runtime's ``MatMulNBitsQuantizer`` with 8 bits, symmetric, per block of
  ``QUANT_BLOCK`` weights along K: int8 weights, nothing calibrated. ``QUANT_ACCURACY_LEVEL`` 4 lets
  ORT's CPU kernel multiply with activations quantised per block at run time, its fast 8-bit path.
  At level 0 (fp32 compute) ORT 1.32 has no fast 8-bit kernel on this AVX2 CPU: a random 1024-wide,
  8-layer Llama decoder took 1213 ms per decode step (past 600) against 172 ms in fp32 and 68 ms at
  level 4 (2 threads, a busy 2-core machine; prefill of 600 tokens 5.6, 5.5 and 6.2 s), with logits
  errors alike at both levels (0.52 vs 0.50 on the tiny test models at init 0.3).

``vlm_parity(family, root, images, questions, ...)`` runs the ORT graphs against the torch family on
one left-padded batch: each graph's max error, the prefill logits, the decode steps against
``DecoderGraph`` in torch with its cache, and greedy tokens from this module's numpy loop
(``greedy_decode``) against ``VLMFamily.generate``. ``vlm_record`` turns the files and the parity
into the manifest's ``exports.vlm`` (``rtrt.runtime.exports.VlmExport``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from rtrt.runtime.exports import VlmExport, VlmGraphExport
from rtrt.runtime.fileio import atomic_write_bytes, sha256_file
from rtrt.runtime.machine import machine_info
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.names import (
    DECODER,
    EMBED_TOKENS,
    QWEN_VISION_INPUTS,
    VISION_ENCODER,
    VISION_ENCODER_REFINED,
    VLM_CONFIG_FILES,
    VLM_DECODER_INPUTS,
    VLM_DECODER_OUTPUTS,
    VLM_EMBED_INPUTS,
    VLM_EMBED_OUTPUTS,
    VLM_ONNX_DIR,
    VLM_VISION_OUTPUTS,
    VLM_REFINE_MASK,
    VLM_CLASS_BIAS,
    VLM_TOKENS_PER_ROW,
    past_names,
    vlm_onnx_file,
)

from .common import ExportError
from .onnx_export import OPSET
from .parity import synthetic_z

__all__ = [
    "EXTERNAL_DATA_BYTES",
    "QUANT_BLOCK",
    "compact_graph",
    "QUANT_ACCURACY_LEVEL",
    "QUANT_METHOD",
    "PARITY_STEPS",
    "DecoderDims",
    "decoder_dims",
    "DecoderGraph",
    "EmbedTokensGraph",
    "VisionEncoderGraph",
    "export_decoder",
    "export_embed_tokens",
    "export_vision_encoder",
    "quantize_decoder",
    "copy_vlm_configs",
    "export_vlm",
    "GreedyRun",
    "greedy_decode",
    "vision_feeds",
    "decoder_positions",
    "place_visual_tokens",
    "token_ids",
    "VlmParity",
    "vlm_parity",
    "vlm_record",
]

EXTERNAL_DATA_BYTES = 2_000_000_000  # weights above this go to "<file>_data" (protobuf's 2 GB cap)
QUANT_BLOCK = 32  # int8 weight-only: one scale per 32 weights along K (finer than ORT's 128; 8 bits cost little more)
PARITY_STEPS = 8  # greedy tokens compared with torch's generate at export
QUANT_ACCURACY_LEVEL = 4  # MatMulNBits accuracy_level: int8 compute (activations quantised per block at run time); see above
QUANT_METHOD = (f"onnxruntime MatMulNBits int8 weights, symmetric, block {QUANT_BLOCK}, accuracy_level {QUANT_ACCURACY_LEVEL} "
                "(int8 compute, activations quantised per block at run time)")
_FAMILIES = ("llava", "qwen2_5_vl", "internvl")


@dataclass(frozen=True)
class DecoderDims:
    """What the decoder's inputs and cache look like (and what ``exports.vlm`` records)."""

    num_layers: int  # decoder layers: one past/present key and value each
    num_kv_heads: int  # key/value heads of every cache tensor [B, kv_heads, P, head_dim]
    head_dim: int  # width of one key/value head
    hidden_size: int  # D of inputs_embeds
    vocab_size: int  # last dim of logits (the LM head's rows)
    position_rows: int  # 1: position_ids [B, S]; 3: Qwen2.5-VL's M-RoPE rows [3, B, S]


def decoder_dims(family) -> DecoderDims:
    """The decoder's dimensions, from the family's text config and LM head."""
    text = family.model.config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    return DecoderDims(
        num_layers=int(text.num_hidden_layers),
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        hidden_size=int(text.hidden_size),
        vocab_size=int(family.model.get_output_embeddings().weight.shape[0]),
        position_rows=3 if family.name == "qwen2_5_vl" else 1,
    )


def _check_family(family) -> None:
    if family.name not in _FAMILIES:
        raise ExportError(f"cannot export a {family.name!r} VLM to ONNX (families: {', '.join(_FAMILIES)})")
    dtype = next(family.model.parameters()).dtype
    if dtype != torch.float32:
        raise ExportError(f"the VLM is loaded in {dtype}; export it from float32 weights (load_vlm(ref, dtype=torch.float32))")


# ------------------------------------------------------------------------------------------ graphs
class DecoderGraph(nn.Module):
    """Language model + LM head with flat cache tensors (``names`` "Decoder").

    ``forward(inputs_embeds [B, S, D], attention_mask [B, P+S], position_ids [B, S] or [3, B, S],
    *past [B, kv_heads, P, head_dim] x 2 layers) -> (logits [B, S, vocab], *present [.., P+S, ..])``.
    """

    def __init__(self, family):
        super().__init__()
        model = family.model
        self.language_model = model.model.language_model
        self.lm_head = model.get_output_embeddings()
        self.text_config = model.config.get_text_config()
        self.num_layers = int(self.text_config.num_hidden_layers)
        # transformers 5.24 names the cache argument ``cache`` (``past_key_values`` until 5.40, deprecated).
        import inspect

        self._cache_arg = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.text_config)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=True, **{self._cache_arg: cache})
        logits = self.lm_head(out.last_hidden_state)
        return (logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


class EmbedTokensGraph(nn.Module):
    """``input_ids [B, S] -> inputs_embeds [B, S, D]``: the text model's token embedding."""

    def __init__(self, family):
        super().__init__()
        self.embed = family.model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class VisionEncoderGraph(nn.Module):
    """LLaVA's or InternVL's vision tower + projector (+ the adapter with W): ``pixel_values -> image_features [T_total, D]``."""

    def __init__(self, family, adapter: CrossAttentionAdapter | None = None, W: torch.Tensor | None = None):
        super().__init__()
        if family.name not in ("llava", "internvl"):
            raise ExportError(f"VisionEncoderGraph serves llava and internvl, not {family.name!r}")
        if (adapter is None) != (W is None):
            raise ExportError("the refined vision encoder needs both the adapter and W")
        self.family_name = family.name
        self.model = family.model
        self.adapter = adapter
        if W is not None:
            self.register_buffer("class_embeddings", W.detach().float().clone(), persistent=False)

    def _llava(self, pixel_values):
        # LlavaModel.get_image_features without its last step (list(features) per image).
        inner, cfg = self.model.model, self.model.config
        out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        picked = [out.hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return inner.multi_modal_projector(torch.cat(picked, dim=-1))

    def forward(self, pixel_values, refine_mask=None, class_bias=None):
        if self.family_name == "llava":
            features = self._llava(pixel_values)
        else:
            features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        features = features.reshape(-1, features.shape[-1])
        if self.adapter is not None:
            bias = None if class_bias is None else class_bias[None].to(features.dtype)  # detector_bias: [1, T_total, C]
            refined = self.adapter(features[None], self.class_embeddings.to(features.dtype), class_bias=bias)[0]
            # Where the mask is 0 the token stays the stock encoder's, bit for bit (Pipeline.refine_mask_z).
            features = refined if refine_mask is None else torch.where(refine_mask[:, None] > 0, refined, features)
        return features


# ------------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _log_level(name: str, level: int):
    """Logger ``name`` (the root logger for "") at ``level`` inside the block."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _export(module: nn.Module, args: tuple, inputs: Sequence[str], outputs: Sequence[str], dynamic_shapes: dict,
            path: Path, graph: str, family: str, verbose: bool, metadata: Mapping[str, str] | None = None) -> Path:
    """torch.onnx (dynamo) export of ``module`` to ``path``; weights over ``EXTERNAL_DATA_BYTES`` go to ``<file>_data``."""
    import onnx_ir

    path = Path(path)
    sink = io.StringIO()
    quiet = contextlib.ExitStack()
    if not verbose:  # the dynamo exporter prints its progress and its optimiser logs; failures still raise
        quiet.enter_context(contextlib.redirect_stdout(sink))
        quiet.enter_context(contextlib.redirect_stderr(sink))
        quiet.enter_context(_log_level("onnxscript", logging.ERROR))
    try:
        with quiet, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(inputs),
                                        output_names=list(outputs), dynamic_shapes=dynamic_shapes, optimize=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path.name}: torch.onnx.export failed ({type(e).__name__}: {first})") from e
    program.model.metadata_props.update({"rtrt.graph": graph, "rtrt.family": family, **dict(metadata or {})})
    # The exporter tags every node with its Python stack trace and module path: about 2 kB a node
    # (most of a small graph) and this machine's file paths in a shipped bundle. The graph does not need them.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    weights = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_ir.save(program.model, path, external_data=f"{path.name}_data" if weights > EXTERNAL_DATA_BYTES else None)
    return path


def export_decoder(family, path: str | os.PathLike, *, verbose: bool = False) -> Path:
    """``decoder_model_merged.onnx``: ``DecoderGraph(family)`` with dynamic batch, new tokens and past length."""
    _check_family(family)
    dims = decoder_dims(family)
    Dim = torch.export.Dim
    batch, seq, past = Dim("batch_size", min=1, max=1 << 12), Dim("sequence_length", min=1, max=1 << 20), Dim("past_sequence_length", min=0, max=1 << 20)
    total = Dim("total_sequence_length", min=1, max=1 << 21)
    b, s, p = 3, 5, 7  # none is 0 or 1 (torch.export would specialise them) and no two are equal
    positions = torch.arange(p, p + s).expand(b, s)
    if dims.position_rows == 3:
        positions = positions[None].expand(3, b, s)
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(b, s, dims.hidden_size, generator=gen), torch.ones(b, p + s, dtype=torch.long), positions.contiguous(),
            *[torch.randn(b, dims.num_kv_heads, p, dims.head_dim, generator=gen) for _ in range(2 * dims.num_layers)])
    shapes = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {1: batch, 2: seq} if dims.position_rows == 3 else {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * dims.num_layers)),
    }
    pasts, presents = past_names(dims.num_layers)
    return _export(DecoderGraph(family).eval(), args, [*VLM_DECODER_INPUTS, *pasts], [*VLM_DECODER_OUTPUTS, *presents],
                   shapes, Path(path), DECODER, family.name, verbose)


def export_embed_tokens(family, path: str | os.PathLike, *, verbose: bool = False) -> Path:
    """``embed_tokens.onnx``: ``input_ids`` int64 [B, S] -> ``inputs_embeds`` [B, S, D]."""
    _check_family(family)
    Dim = torch.export.Dim
    ids = torch.randint(0, int(family.model.get_input_embeddings().num_embeddings), (2, 5), generator=torch.Generator().manual_seed(0))
    shapes = {"input_ids": {0: Dim("batch_size", min=1, max=1 << 12), 1: Dim("sequence_length", min=1, max=1 << 20)}}
    return _export(EmbedTokensGraph(family).eval(), (ids,), VLM_EMBED_INPUTS, VLM_EMBED_OUTPUTS, shapes, Path(path),
                   EMBED_TOKENS, family.name, verbose)


def export_vision_encoder(family, path: str | os.PathLike, adapter: CrossAttentionAdapter | None = None,
                          W: torch.Tensor | None = None, *, verbose: bool = False) -> Path:
    """``vision_encoder.onnx`` (or, with ``adapter`` and ``W`` [C, D], ``vision_encoder_refined.onnx``) of any family.

    LLaVA and InternVL take ``pixel_values`` [N, 3, H, W] (images or tiles, N dynamic), their refined
    encoder also ``refine_mask`` [N * tokens per row] (metadata ``rtrt.tokens_per_row``); Qwen2.5-VL
    is exported by ``rtrt.export.vlm_onnx_qwen.export_qwen_vision`` (inputs ``QWEN_VISION_INPUTS``).
    """
    _check_family(family)
    if adapter is not None and adapter.config.detector_bias and family.name != "llava":
        raise ExportError(f"an adapter trained with detector_bias needs LLaVA's fixed token grid, not {family.name!r}")
    if family.name == "qwen2_5_vl":
        from .vlm_onnx_qwen import export_qwen_vision

        return export_qwen_vision(family, path, adapter, W, verbose=verbose)
    vision = family.model.config.vision_config
    size = vision.image_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pixels = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    axis = "num_images" if family.name == "llava" else "num_tiles"
    module = VisionEncoderGraph(family, adapter, W).eval()
    images = torch.export.Dim(axis, min=1, max=1 << 12)
    if adapter is None:
        return _export(module, (pixels,), ("pixel_values",), VLM_VISION_OUTPUTS, {"pixel_values": {0: images}}, Path(path),
                       VISION_ENCODER, family.name, verbose)
    # The refined encoder also takes the refinement mask, one value per visual token (ones: every
    # token refined); its length is the images' count times the tokens each gives, a fixed number.
    biased = adapter.config.detector_bias
    with torch.no_grad():  # the stock encoder's rows: the refined one gives as many
        per_image = int(VisionEncoderGraph(family).eval()(pixels).shape[0]) // pixels.shape[0]
    mask = torch.ones(pixels.shape[0] * per_image)
    if not biased:
        return _export(module, (pixels, mask), ("pixel_values", VLM_REFINE_MASK), VLM_VISION_OUTPUTS,
                       {"pixel_values": {0: images}, VLM_REFINE_MASK: {0: images * per_image}}, Path(path), VISION_ENCODER_REFINED,
                       family.name, verbose, {VLM_TOKENS_PER_ROW: str(per_image)})
    # detector_bias: also class_bias [T_total, C], the detector's z-scores at each token (C = W's rows, fixed).
    bias = torch.randn(pixels.shape[0] * per_image, int(W.shape[0]), generator=torch.Generator().manual_seed(1))
    return _export(module, (pixels, mask, bias), ("pixel_values", VLM_REFINE_MASK, VLM_CLASS_BIAS), VLM_VISION_OUTPUTS,
                   {"pixel_values": {0: images}, VLM_REFINE_MASK: {0: images * per_image}, VLM_CLASS_BIAS: {0: images * per_image}},
                   Path(path), VISION_ENCODER_REFINED, family.name, verbose, {VLM_TOKENS_PER_ROW: str(per_image)})


def quantize_decoder(src: str | os.PathLike, dst: str | os.PathLike, *, block_size: int = QUANT_BLOCK) -> Path:
    """The int8 weight-only decoder: every MatMul with a constant weight becomes ``MatMulNBits`` (8 bits, symmetric,
    ``QUANT_ACCURACY_LEVEL``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8, accuracy_level=QUANT_ACCURACY_LEVEL)
    try:
        with _log_level("", logging.ERROR):  # the quantiser logs every node it visits
            quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                             accuracy_level=QUANT_ACCURACY_LEVEL, algo_config=config)
            quantizer.process()
    except Exception as e:
        raise ExportError(f"{src.name}: int8 weight-only quantisation failed ({type(e).__name__}: {e})") from e
    out = quantizer.model.model
    # An fp32 source with external data stays external (and its proto may be past what ByteSize can count).
    large = (src.parent / f"{src.name}_data").is_file() or out.ByteSize() > EXTERNAL_DATA_BYTES
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(out, str(dst), save_as_external_data=large, location=f"{dst.name}_data" if large else None)
    return dst


def _config_dir(source: str | os.PathLike) -> Path:
    """The local folder of the VLM's files: ``source`` itself, or the hub snapshot of ``org/name@<commit>``."""
    if Path(source).is_dir():
        return Path(source)
    from rtrt.runtime.bundle import split_pinned

    name, commit = split_pinned(str(source))
    if commit is None:
        raise ExportError(f"{source}: the VLM's configs need a local directory or a hub id pinned to a commit")
    from huggingface_hub import snapshot_download  # a transformers dependency; the same files load_vlm fetched

    return Path(snapshot_download(name, revision=commit, allow_patterns=list(VLM_CONFIG_FILES)))


def copy_vlm_configs(source: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Copy the VLM's ``VLM_CONFIG_FILES`` that exist in ``source`` to ``out_dir``; returns the copies."""
    src, out = _config_dir(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in VLM_CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(out / name)
    if not any(p.name == "config.json" for p in copied):
        raise ExportError(f"{src}: no config.json beside the VLM")
    return copied


def export_vlm(family, out_dir: str | os.PathLike, *, source: str | os.PathLike, adapter: CrossAttentionAdapter | None = None,
               W: torch.Tensor | None = None, quantized: bool = False, verbose: bool = False,
               log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the whole VLM's graphs and configs under ``out_dir`` (see the module docstring).

    ``source``: where the VLM was loaded from (its configs are copied). ``adapter`` and ``W``: the
    bundle's, for ``vision_encoder_refined`` (left out without them). Returns every written file
    by its bundle-relative path (``vlm_onnx/onnx/decoder_model_merged.onnx``, external data included).
    """
    log = log or (lambda msg: None)
    _check_family(family)
    out = Path(out_dir)
    files: dict[str, Path] = {}
    for p in copy_vlm_configs(source, out / VLM_ONNX_DIR):
        files[f"{VLM_ONNX_DIR}/{p.name}"] = p
    jobs: list[tuple[str, Callable[[Path], Path]]] = [(VISION_ENCODER, lambda p: export_vision_encoder(family, p, verbose=verbose))]
    if adapter is not None:
        jobs.append((VISION_ENCODER_REFINED, lambda p: export_vision_encoder(family, p, adapter, W, verbose=verbose)))
    jobs += [(EMBED_TOKENS, lambda p: export_embed_tokens(family, p, verbose=verbose)),
             (DECODER, lambda p: export_decoder(family, p, verbose=verbose))]
    for graph, job in jobs:
        t = time.monotonic()
        rel = vlm_onnx_file(graph)
        job(out / rel)
        files.update(_with_data(out, rel))
        log(f"      {rel} ({time.monotonic() - t:.1f} s)")
    if quantized:
        t = time.monotonic()
        rel = vlm_onnx_file(DECODER, "quantized")
        quantize_decoder(out / vlm_onnx_file(DECODER), out / rel)
        files.update(_with_data(out, rel))
        log(f"      {rel} ({time.monotonic() - t:.1f} s)")
    # After the quantizer read the fp32 decoder (it needs MatMul weights as initializers): weights
    # that are exactly float16 values (a half-precision checkpoint) stored as float16 + Cast.
    saved = sum(compact_graph(out / vlm_onnx_file(graph)) for graph, _ in jobs)
    if saved:
        log(f"      exactly-half weights stored as float16: {saved / 1e6:.1f} MB less, outputs bit-identical")
    return files


def compact_graph(path: Path) -> int:
    """``export.compact.store_exact_fp16`` on a graph saved in one file (not one with ``<file>_data``); bytes saved."""
    import onnx

    from .compact import store_exact_fp16

    if Path(f"{path}_data").exists():
        return 0
    model, saved = store_exact_fp16(onnx.load(str(path)))
    if saved:
        atomic_write_bytes(path, model.SerializeToString())
    return saved


def _with_data(root: Path, rel: str) -> dict[str, Path]:
    """``rel`` and, when it was saved with external data, its ``<file>_data``."""
    found = {rel: root / rel}
    if (root / f"{rel}_data").is_file():
        found[f"{rel}_data"] = root / f"{rel}_data"
    return found


# ------------------------------------------------------------------------------------------ running
@dataclass
class GreedyRun:
    """What ``greedy_decode`` produced."""

    tokens: np.ndarray  # int64 [B, n]: new tokens, a finished row padded with pad_token_id; n <= max_new_tokens
    prefill_logits: np.ndarray  # [B, S, vocab]: the decoder's logits over the prompt (past length 0)
    step_logits: list[np.ndarray] = field(default_factory=list)  # [B, vocab] per step: what each token was picked from


Step = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]  # decoder feeds -> (logits, *present)
Embed = Callable[[np.ndarray], np.ndarray]  # input_ids [B, S] -> inputs_embeds [B, S, D]


def greedy_decode(step: Step, embed: Embed, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  dims: DecoderDims, *, max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int | None) -> GreedyRun:
    """Greedy decoding with the KV cache, as ``generate(do_sample=False)`` does it: prefill from an empty
    past, then one token per step at position ``last + 1`` (every M-RoPE row alike: the prompt ends in
    text); a row stops at an EOS and emits ``pad_token_id`` after it; all rows stopped ends the loop."""
    batch = inputs_embeds.shape[0]
    pasts, _ = past_names(dims.num_layers)
    empty = np.zeros((batch, dims.num_kv_heads, 0, dims.head_dim), np.float32)
    mask = np.asarray(attention_mask, np.int64)
    position = np.asarray(position_ids, np.int64)[..., -1:]
    feeds = dict(zip(VLM_DECODER_INPUTS, (np.asarray(inputs_embeds, np.float32), mask, np.asarray(position_ids, np.int64))))
    feeds.update({n: empty for n in pasts})
    eos = np.asarray(list(eos_token_ids), np.int64)
    running = np.ones(batch, bool)
    tokens, step_logits, prefill = [], [], None
    for _ in range(max_new_tokens):
        out = step(feeds)
        if prefill is None:
            prefill = np.asarray(out[0])
        last = np.asarray(out[0])[:, -1]
        step_logits.append(last)
        token = last.argmax(-1).astype(np.int64)
        if pad_token_id is not None:
            token = np.where(running, token, pad_token_id)
        tokens.append(token)
        running &= ~np.isin(token, eos)
        if not running.any():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        position = position + 1
        feeds = dict(zip(VLM_DECODER_INPUTS, (embed(token[:, None]), mask, position)))
        feeds.update(zip(pasts, out[1:]))
    return GreedyRun(np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64), prefill, step_logits)


def vision_feeds(family, batch) -> dict[str, np.ndarray]:
    """The vision encoder's feeds for a ``VLMFamily.prepare`` batch (Qwen2.5-VL: + its grid index inputs)."""
    feeds = {"pixel_values": batch["pixel_values"].detach().float().cpu().numpy()}
    if family.name == "qwen2_5_vl":
        from rtrt.runtime.vlm_ort.qwen_vision import qwen_vision_inputs

        index = qwen_vision_inputs(batch["image_grid_thw"].cpu().numpy(), family.model.config.to_dict())
        feeds.update({n: index[n] for n in QWEN_VISION_INPUTS[1:]})
    return feeds


def decoder_positions(family, batch) -> np.ndarray:
    """``position_ids`` of the prompt as ``generate`` builds them: [B, S], or Qwen2.5-VL's M-RoPE rows [3, B, S]."""
    pos = family.position_ids(batch).cpu().numpy().astype(np.int64)
    return pos[1:] if family.name == "qwen2_5_vl" else pos  # Qwen's [4, B, S]: the text row, then the 3 M-RoPE rows


def place_visual_tokens(embeds: np.ndarray, input_ids: np.ndarray, image_token_id: int, tokens: np.ndarray) -> np.ndarray:
    """``embeds`` [B, S, D] with ``tokens`` [T, D] at the image positions in row-major order (the stock ``masked_scatter``)."""
    mask = np.asarray(input_ids) == image_token_id
    if int(mask.sum()) != len(tokens):
        raise ExportError(f"{len(tokens)} visual tokens for {int(mask.sum())} image positions")
    out = np.array(embeds, dtype=np.float32, copy=True)
    out[mask] = tokens
    return out


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_step(session) -> Step:
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run(None, {n: feeds[n] for n in names})


def _torch_step(module: DecoderGraph, dims: DecoderDims) -> Step:
    pasts, _ = past_names(dims.num_layers)

    def run(feeds):
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in (*VLM_DECODER_INPUTS, *pasts)]
            return [t.numpy() for t in module(*args)]

    return run


def _max_err(a, b, where: np.ndarray | None = None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if where is not None:
        diff = diff[where]
    return float(diff.max()) if diff.size else 0.0


def _scale(b, where: np.ndarray | None = None) -> float:
    """max |b| over the compared elements: the size an output's error is judged against."""
    mag = np.abs(np.asarray(b, np.float64))
    if where is not None:
        mag = mag[where]
    return float(mag.max()) if mag.size else 0.0


@dataclass
class VlmParity:
    """The exported VLM against the torch family on one batch (``exports.vlm.parity``)."""

    inputs: str  # where the images came from
    prompt_tokens: list[int] = field(default_factory=list)  # each row's prompt length without its left padding
    padded_length: int = 0  # S of the left-padded batch
    max_abs_error: dict[str, float] = field(default_factory=dict)  # "graph" or "graph.output" -> max |ORT - torch|
    first_step_logits_error: float = 0.0  # max |ORT - torch| of the logits the first new token is picked from (whole ORT chain)
    steps: int = 0  # greedy steps asked for
    tokens_torch: list[list[int]] = field(default_factory=list)  # VLMFamily.generate's new tokens (greedy)
    tokens_ort: list[list[int]] = field(default_factory=list)  # the ORT graphs' new tokens (greedy_decode)
    tokens_identical: bool = False  # tokens_ort == tokens_torch
    quantized: dict[str, Any] | None = None  # int8 decoder: first-step logits error, token agreement, tokens (reported, not required)
    tolerance: float = 0.0  # every fp32 output: max abs error <= tolerance * max(1, scale)
    scale: dict[str, float] = field(default_factory=dict)  # same keys as max_abs_error (+ "first_step_logits"): max |torch output|
    failures: list[str] = field(default_factory=list)  # one line per violated bound (empty: passed)
    machine: dict = field(default_factory=dict)  # rtrt.runtime.machine.machine_info() of the machine that ran both

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_error.items())
        q = ""
        if self.quantized is not None:
            q = (f"; int8 decoder: first-step logits error {self.quantized['first_step_logits_error']:.2e}, "
                 f"token agreement {self.quantized['token_agreement']:.1%}")
        return (f"vlm fp32: max abs error {errs}; greedy tokens {'identical' if self.tokens_identical else 'DIFFERENT'} "
                f"over {self.steps} steps{q} -> {'ok' if self.passed else 'FAILED'}")


def vlm_parity(family, root: str | os.PathLike, images: Sequence, questions: Sequence[str], *,
               adapter: CrossAttentionAdapter | None = None, W: torch.Tensor | None = None, steps: int = PARITY_STEPS,
               tolerance: float = 1e-3, inputs: str = "") -> VlmParity:
    """Run the graphs under ``root`` (``vlm_onnx/onnx/...``) against ``family`` on one batch of ``images``/``questions``.

    The ORT chain is the runtime's: vision encoder (refined when ``adapter`` is given), token
    embedding, visual tokens placed at the image positions, the decoder from an empty past, then
    ``greedy_decode``. Checked: each graph's output against its torch counterpart, the prefill
    logits against ``VLMFamily.forward``, every decode step against ``DecoderGraph`` in torch fed
    the same inputs, and the tokens against ``VLMFamily.generate`` (identical required). The
    quantized decoder, when present, is reported.
    """
    root = Path(root)
    dims = decoder_dims(family)
    eos, pad = token_ids(family)
    W = None if W is None else W.detach().float()
    report = VlmParity(inputs=inputs, steps=steps, tolerance=tolerance, machine=machine_info())
    with torch.inference_mode():
        batch = family.prepare(list(images), list(questions))
        stock = family.visual_tokens(batch)
        # detector_bias: synthetic z-scores [T_total, C] (seeded), the same for torch and ORT
        bias = synthetic_z((stock.shape[0], W.shape[0]), np.random.default_rng(0)) if adapter is not None and adapter.config.detector_bias else None
        cb = None if bias is None else torch.from_numpy(bias)[None]
        transform = None if adapter is None else (
            lambda v: adapter(v[None], W.to(v.dtype), class_bias=None if cb is None else cb.to(v.dtype))[0])
        refined = transform(stock) if transform is not None else None
        ids = batch["input_ids"]
        ref_embeds = family.model.get_input_embeddings()(ids)
        ref_logits = family.forward(batch, transform).logits.float().numpy()
        ref_tokens = family.generate(batch, transform, max_new_tokens=steps).cpu().numpy()
    mask = batch["attention_mask"].cpu().numpy().astype(np.int64)
    report.prompt_tokens = [int(v) for v in mask.sum(1)]
    report.padded_length = int(mask.shape[1])
    ids_np = ids.cpu().numpy().astype(np.int64)

    sessions = {g: _session(root / vlm_onnx_file(g)) for g in (VISION_ENCODER, EMBED_TOKENS, DECODER)}
    feeds = vision_feeds(family, batch)
    vision = sessions[VISION_ENCODER]
    tokens = vision.run(None, {i.name: feeds[i.name] for i in vision.get_inputs()})[0]
    report.max_abs_error[VISION_ENCODER] = _max_err(tokens, stock.numpy())
    report.scale[VISION_ENCODER] = _scale(stock.numpy())
    if adapter is not None:
        s = _session(root / vlm_onnx_file(VISION_ENCODER_REFINED))
        names = [i.name for i in s.get_inputs()]
        every = {VLM_REFINE_MASK: np.ones(len(stock), np.float32)} if VLM_REFINE_MASK in names else {}
        if VLM_CLASS_BIAS in names:
            every[VLM_CLASS_BIAS] = bias
        tokens = s.run(None, {n: feeds[n] for n in names if n not in every} | every)[0]
        report.max_abs_error[VISION_ENCODER_REFINED] = _max_err(tokens, refined.numpy())
        report.scale[VISION_ENCODER_REFINED] = _scale(refined.numpy())
        if every:  # every other token refined: those rows the refined tokens, the rest the stock ones
            alternate = (np.arange(len(stock)) % 2).astype(np.float32)
            mixed = s.run(None, {n: feeds[n] for n in names if n not in every} | every | {VLM_REFINE_MASK: alternate})[0]
            expected = np.where(alternate[:, None] > 0, refined.numpy(), stock.numpy())
            report.max_abs_error[f"{VISION_ENCODER_REFINED}.masked"] = _max_err(mixed, expected)
            report.scale[f"{VISION_ENCODER_REFINED}.masked"] = _scale(expected)
    embed_session = sessions[EMBED_TOKENS]

    def embed(x: np.ndarray) -> np.ndarray:
        return embed_session.run(None, {VLM_EMBED_INPUTS[0]: np.asarray(x, np.int64)})[0]

    text = embed(ids_np)
    report.max_abs_error[EMBED_TOKENS] = _max_err(text, ref_embeds.numpy())
    report.scale[EMBED_TOKENS] = _scale(ref_embeds.numpy())
    embeds = place_visual_tokens(text, ids_np, family.image_token_id, tokens)
    positions = decoder_positions(family, batch)
    run = greedy_decode(_ort_step(sessions[DECODER]), embed, embeds, mask, positions, dims,
                        max_new_tokens=steps, eos_token_ids=eos, pad_token_id=pad)
    report.max_abs_error[f"{DECODER}.prefill_logits"] = _max_err(run.prefill_logits, ref_logits, mask.astype(bool))
    report.scale[f"{DECODER}.prefill_logits"] = _scale(ref_logits, mask.astype(bool))
    report.first_step_logits_error = _max_err(run.step_logits[0], ref_logits[:, -1])
    report.scale["first_step_logits"] = _scale(ref_logits[:, -1])
    # Decode steps: the torch decoder with its own cache, fed the same inputs while the tokens agree.
    module = DecoderGraph(family).eval()
    ref_run = greedy_decode(_torch_step(module, dims), embed, embeds, mask, positions, dims,
                            max_new_tokens=steps, eos_token_ids=eos, pad_token_id=pad)
    same = 0
    while same < min(len(run.step_logits), len(ref_run.step_logits)) and (same == 0 or np.array_equal(run.tokens[:, same - 1], ref_run.tokens[:, same - 1])):
        same += 1
    report.max_abs_error[f"{DECODER}.decode_logits"] = max(
        (_max_err(a, b) for a, b in zip(run.step_logits[1:same], ref_run.step_logits[1:same])), default=0.0)
    report.scale[f"{DECODER}.decode_logits"] = max((_scale(b) for b in ref_run.step_logits[1:same]), default=0.0)
    report.tokens_torch = ref_tokens.tolist()
    report.tokens_ort = run.tokens.tolist()
    report.tokens_identical = run.tokens.shape == ref_tokens.shape and bool(np.array_equal(run.tokens, ref_tokens))
    # The bound scales with the output (logits run to 20 and more; float32 rounding grows with them):
    # absolute for outputs within +-1, relative to the largest magnitude above that.
    for k, v in {**report.max_abs_error, "first_step_logits": report.first_step_logits_error}.items():
        bound = tolerance * max(1.0, report.scale[k])
        if not v <= bound:  # NaN fails too
            report.failures.append(f"{k} max abs error {v:.3g} > {bound:.3g} ({tolerance:g} x max(1, max |torch| {report.scale[k]:.3g}))")
    if not report.tokens_identical:
        report.failures.append(f"greedy tokens differ from torch's generate: {report.tokens_ort} vs {report.tokens_torch}")
    quantized = root / vlm_onnx_file(DECODER, "quantized")
    if quantized.is_file():
        q = greedy_decode(_ort_step(_session(quantized)), embed, embeds, mask, positions, dims,
                          max_new_tokens=steps, eos_token_ids=eos, pad_token_id=pad)
        n = min(q.tokens.shape[1], ref_tokens.shape[1])
        agree = float((q.tokens[:, :n] == ref_tokens[:, :n]).mean()) if n else 0.0
        report.quantized = {
            "first_step_logits_error": _max_err(q.step_logits[0], ref_logits[:, -1]),
            "prefill_logits_error": _max_err(q.prefill_logits, ref_logits, mask.astype(bool)),
            "first_token_agreement": float((q.tokens[:, 0] == ref_tokens[:, 0]).mean()),
            "token_agreement": agree,
            "tokens_identical": q.tokens.shape == ref_tokens.shape and bool(np.array_equal(q.tokens, ref_tokens)),
            "tokens": q.tokens.tolist(),
        }
    return report


def token_ids(family) -> tuple[list[int], int | None]:
    """(EOS ids, pad id) greedy decoding uses: the generation config's, else the text config's."""
    gen = family.model.generation_config
    text = family.model.config.get_text_config()
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(text, "eos_token_id", None)
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = gen.pad_token_id
    if pad is None:
        pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = getattr(family.model.config, "pad_token_id", None)
    if pad is None and eos_ids:
        pad = eos_ids[0]  # generate pads finished rows with EOS when no pad id is set
    return eos_ids, None if pad is None else int(pad)


# ------------------------------------------------------------------------------------------ record
def _graph_io(path: Path) -> tuple[int, int, dict[str, list], dict[str, list]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in v.type.tensor_type.shape.dim]

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return int(opset), len(model.graph.node), {i.name: dims(i) for i in model.graph.input}, {o.name: dims(o) for o in model.graph.output}


def vlm_record(family, files: Mapping[str, Path], parity: VlmParity, *, vlm_ref: str, precision: str,
               versions: Mapping[str, str] | None = None) -> VlmExport:
    """``exports.vlm`` for the files ``export_vlm`` wrote (by bundle-relative path) and their parity."""
    dims = decoder_dims(family)
    eos, pad = token_ids(family)
    text = family.model.config.get_text_config()
    graphs: dict[str, VlmGraphExport] = {}
    per_graph = {VISION_ENCODER: [VISION_ENCODER], VISION_ENCODER_REFINED: [VISION_ENCODER_REFINED, f"{VISION_ENCODER_REFINED}.masked"], EMBED_TOKENS: [EMBED_TOKENS],
                 DECODER: [f"{DECODER}.prefill_logits", f"{DECODER}.decode_logits"]}
    for graph in (VISION_ENCODER, VISION_ENCODER_REFINED, EMBED_TOKENS, DECODER):
        for variant in ("", "quantized"):
            rel = vlm_onnx_file(graph, variant)
            if rel not in files:
                continue
            path = Path(files[rel])
            opset, nodes, ins, outs = _graph_io(path)
            if variant:
                graph_parity = parity.quantized
            else:
                graph_parity = {k: parity.max_abs_error[k] for k in per_graph[graph] if k in parity.max_abs_error}
            graphs[path.stem] = VlmGraphExport(
                file=rel, sha256=sha256_file(path), size=path.stat().st_size,
                external_data=f"{rel}_data" if f"{rel}_data" in files else None,
                opset=opset, nodes=nodes, inputs=ins, outputs=outs,
                method=QUANT_METHOD if variant else None, parity=graph_parity)
    limit = getattr(text, "max_position_embeddings", None)
    return VlmExport(
        family=family.name,
        vlm_ref=str(vlm_ref),
        graphs=graphs,
        config_files=sorted(rel for rel in files if not rel.startswith(f"{VLM_ONNX_DIR}/onnx/")),
        num_layers=dims.num_layers,
        num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        hidden_size=dims.hidden_size,
        vocab_size=dims.vocab_size,
        image_token_id=int(family.image_token_id),
        eos_token_ids=eos,
        pad_token_id=pad,
        position_rows=dims.position_rows,
        context_length=None if limit is None else int(limit),
        precision=precision,
        opset=OPSET,
        exported_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions=dict(versions or {}),
        parity=parity.to_dict(),
    )
