"""The exported VLM on ONNX Runtime: vision encoder, token embedding and decoder, decoded greedily.

``OrtVLM.from_bundle(bundle)`` opens the graphs ``rtrt export --vlm`` wrote under ``vlm_onnx/``
(``rtrt.runtime.names``) and the VLM's own configs beside them; ``answer(images, questions, hints,
refine=...)`` then does what ``Pipeline`` does with a transformers VLM, without torch:

    numpy preprocessing + chat template + tokenizers (``VlmProcessor``)
    -> vision_encoder(_refined).onnx: visual tokens [T, D] (refined: the adapter with W baked in)
    -> embed_tokens.onnx, the visual tokens written at the image positions (row-major, as
       ``masked_scatter`` does in the torch path)
    -> decoder_model_merged.onnx: one prefill call with an empty cache, then one call per new token
       with the cache it returned; greedy (argmax, first index on ties, as torch's argmax);
       finished rows are padded with the pad id, and decoding stops when every row has produced an
       end-of-sequence id or after ``max_new_tokens``: transformers' ``generate`` rules, so the
       tokens equal the torch path's.

Positions: LLaVA and InternVL use the attention mask's running count (left padding skipped), as
``generate`` does; Qwen2.5-VL the three M-RoPE rows of the prompt from its ``get_rope_index``
(in numpy) and, for new tokens, ``cache position + rope_deltas`` on all three rows.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendUnavailableError, BundleError, InputError
from ..names import (
    DECODER,
    EMBED_TOKENS,
    VISION_ENCODER,
    VISION_ENCODER_REFINED,
    VLM_DECODER_INPUTS,
    VLM_DECODER_OUTPUTS,
    VLM_EMBED_INPUTS,
    VLM_EMBED_OUTPUTS,
    VLM_ONNX_DIR,
    VLM_PRECISIONS,
    VLM_VISION_OUTPUTS,
    VLM_REFINE_MASK,
    VLM_CLASS_BIAS,
    VLM_TOKENS_PER_ROW,
    past_names,
    vlm_onnx_file,
)
from ..backends import session_options
from ..prompts import user_text
from .prompt import VlmProcessor, step_position_ids

__all__ = ["OrtVLM", "VLM_PRECISIONS"]


class OrtVLM:
    """A bundle's exported VLM, loaded once; ``answer`` is serialised by a lock (one KV cache at a time)."""

    backend = "ort"  # Pipeline.vlm_backend

    def __init__(self, root: Path, record: Any, sessions: dict[str, Any], processor: Any, precision: str,
                 layout: dict | None = None):
        self.root = Path(root)
        self.record = record
        self._layout = dict(layout or {})  # the bundle's VLMSpec.image_token_layout (the export record has none)
        self.sessions = sessions
        self.processor = processor
        self.precision = precision
        self.name: str = str(record.family)
        self.hidden_size: int = int(record.hidden_size)
        self.layers: int = int(record.num_layers)
        self.position_rows: int = int(record.position_rows)
        self.past_inputs, self.present_outputs = past_names(self.layers)
        dec = sessions[DECODER]
        # Cache tensors' dtype and per-head shape, read off the graph (fp32 here; an fp16 export would say so).
        meta = {i.name: i for i in dec.get_inputs()}
        self._cache_dtype = np.float16 if "float16" in meta[self.past_inputs[0]].type else np.float32
        self._kv_heads = int(record.num_kv_heads)
        self._head_dim = int(record.head_dim)
        self._lock = threading.Lock()
        # Each vision encoder's inputs (the family's pixel inputs), read once.
        self._vision_inputs = {g: [i.name for i in s.get_inputs()] for g, s in sessions.items()
                               if g in (VISION_ENCODER, VISION_ENCODER_REFINED)}
        self.providers = list(dict.fromkeys(p for s in sessions.values() for p in s.get_providers()))
        # The refined encoder's visual tokens per pixel_values row (its metadata), read once: the length of its
        # refine_mask input is that times the rows. None: no refined encoder, or one without the mask input.
        self._tokens_per_row: int | None = None
        if self.takes_refine_mask:
            per = sessions[VISION_ENCODER_REFINED].get_modelmeta().custom_metadata_map.get(VLM_TOKENS_PER_ROW, "")
            if not per.isdigit() or int(per) < 1:
                raise BundleError(f"{self.root}: the refined vision encoder takes {VLM_REFINE_MASK} but its metadata "
                                  f"has no valid {VLM_TOKENS_PER_ROW} ({per!r}); re-export with `rtrt export --vlm`")
            self._tokens_per_row = int(per)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, bundle, *, device: str | None = "cpu", precision: str = "fp32", threads: int | None = None) -> "OrtVLM":
        """Open the exported VLM of ``bundle`` (``BackendUnavailableError`` when it has none)."""
        import onnxruntime as ort

        if precision not in VLM_PRECISIONS:
            raise InputError(f"unknown VLM precision {precision!r}; choose from {', '.join(VLM_PRECISIONS)}")
        record = bundle.manifest.exports.vlm
        if record is None:
            raise BackendUnavailableError(f"{bundle.root}: the bundle has no exported VLM; run `rtrt export --bundle {bundle.root} --vlm`")
        so = session_options(threads)
        have = set(ort.get_available_providers())
        providers = ["CPUExecutionProvider"]
        if device not in (None, "cpu") and "CUDAExecutionProvider" in have:
            index = str(device).partition(":")[2] or "0"
            providers = [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
        sessions: dict[str, Any] = {}
        for graph in (VISION_ENCODER, VISION_ENCODER_REFINED, EMBED_TOKENS, DECODER):
            variant = "quantized" if graph == DECODER and precision == "int8" else ""
            entry = record.graph(graph, variant)  # the record, not the file list: a later fp32 export drops the int8 entry
            if entry is None and graph == VISION_ENCODER_REFINED:
                continue  # a bundle without an adapter exports the stock encoder only
            if entry is None or not bundle.has(entry.file):
                hint = " --precision int8" if variant else ""
                raise BackendUnavailableError(
                    f"{bundle.root}: no exported {vlm_onnx_file(graph, variant)}; run `rtrt export --bundle {bundle.root} --vlm{hint}`")
            sessions[graph] = ort.InferenceSession(str(bundle.path(entry.file)), so, providers=providers)
        unlisted = [f for f in record.config_files if not bundle.has(f)]
        if unlisted or not record.config_files:
            raise BundleError(f"{bundle.root}: the exported VLM's configs are not bundle files ({', '.join(unlisted) or 'none recorded'})")
        processor = VlmProcessor.from_dir(bundle.root / VLM_ONNX_DIR)  # reads only the configs above, hashed at load
        spec = bundle.manifest.vlm
        return cls(bundle.root, record, sessions, processor, precision, spec.image_token_layout if spec is not None else None)

    @property
    def context_length(self) -> int | None:
        n = self.processor.max_positions
        return int(n) if n else None

    def image_token_layout(self) -> dict:
        return dict(getattr(self.record, "image_token_layout", None) or self._layout)

    # ------------------------------------------------------------------ one batch
    def answer(self, images: Sequence, questions: Sequence[str], hints: Sequence[Sequence[str]] | None, *,
               refine: bool, max_new_tokens: int, timer=None, min_new_tokens: int = 0,
               refine_mask: np.ndarray | None = None, class_bias: np.ndarray | None = None) -> list[str]:
        """Greedy answers, one per (image, question); ``hints``: names per image or None (no hint).
        ``min_new_tokens``: end-of-sequence is not chosen before this many tokens (benchmarks).
        ``refine_mask`` [T_total] (with ``refine``): the refined tokens only where it is non-zero, the
        plain vision encoder's elsewhere (one run of the refined encoder); None: refined everywhere.
        ``class_bias`` [T_total, C] (with ``refine``): the detector's z-scores, for an adapter trained with detector_bias."""
        texts = [user_text(q, hints[i] if hints is not None else None) for i, q in enumerate(questions)]
        with self._lock:
            tokens, ms = self.generate(images, texts, refine=refine, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       refine_mask=refine_mask, class_bias=class_bias)
        if timer is not None:
            timer.ms.update({k: timer.ms.get(k, 0.0) + v for k, v in ms.items()})
        return [a.strip() for a in self.processor.decode(tokens)]

    def vision_features(self, feeds: dict[str, np.ndarray], refine: bool, refine_mask: np.ndarray | None = None,
                        class_bias: np.ndarray | None = None) -> np.ndarray:
        """Visual tokens [T_total, D] of every image of the batch (refined when ``refine``; with
        ``refine_mask``, only where it is non-zero: the refined encoder's ``refine_mask`` input;
        ``class_bias``: its ``class_bias`` input, which an adapter trained with detector_bias needs)."""
        graph = VISION_ENCODER_REFINED if refine else VISION_ENCODER
        if graph not in self.sessions:
            raise BundleError(f"{self.root}: the bundle has no refined vision encoder (no adapter was exported)")
        names = self._vision_inputs[graph]
        takes_mask = refine and self.takes_refine_mask
        if refine and refine_mask is not None and not takes_mask:
            raise BundleError(f"{self.root}: the exported refined vision encoder takes no {VLM_REFINE_MASK} (exported by an "
                              f"older rtrt); re-export it with `rtrt export --bundle {self.root} --vlm`")
        takes_bias = refine and self.takes_class_bias
        if refine and (class_bias is not None) != takes_bias:
            raise BundleError(f"{self.root}: the exported refined vision encoder takes no {VLM_CLASS_BIAS}; re-export it with "
                              f"`rtrt export --bundle {self.root} --vlm`" if class_bias is not None else
                              f"{self.root}: the exported refined vision encoder needs {VLM_CLASS_BIAS} (its adapter was "
                              "trained with detector_bias)")
        extra = (VLM_REFINE_MASK, VLM_CLASS_BIAS)
        missing = [n for n in names if n not in feeds and n not in extra]
        if missing:
            raise InputError(f"the vision encoder needs {', '.join(missing)}, which preprocessing did not give")
        run = {n: feeds[n] for n in names if n not in extra}
        if takes_bias:
            total = self.visual_token_count(feeds)
            if np.ndim(class_bias) != 2 or np.shape(class_bias)[0] != total:
                raise InputError(f"the class bias must be [{total}, C] (one row per visual token), not {np.shape(class_bias)}")
            run[VLM_CLASS_BIAS] = np.ascontiguousarray(class_bias, dtype=np.float32)
        if takes_mask:
            total = self.visual_token_count(feeds)
            if refine_mask is None:
                refine_mask = np.ones(total, np.float32)
            self._check_mask(refine_mask, total)
            run[VLM_REFINE_MASK] = np.ascontiguousarray(refine_mask, dtype=np.float32)
        (out,) = self.sessions[graph].run(list(VLM_VISION_OUTPUTS), run)
        return out.reshape(-1, out.shape[-1])

    @property
    def takes_class_bias(self) -> bool:
        """Whether the refined vision encoder takes ``class_bias`` (an adapter trained with detector_bias)."""
        return VLM_CLASS_BIAS in self._vision_inputs.get(VISION_ENCODER_REFINED, ())

    @property
    def takes_refine_mask(self) -> bool:
        """Whether the refined vision encoder takes ``refine_mask`` (bundles exported before it do not)."""
        return VLM_REFINE_MASK in self._vision_inputs.get(VISION_ENCODER_REFINED, ())

    @staticmethod
    def _check_mask(mask: np.ndarray, tokens: int) -> None:
        if np.ndim(mask) != 1 or np.size(mask) != tokens:
            raise InputError(f"the refinement mask must hold one value per visual token ({tokens}), not an array of shape "
                             f"{np.shape(mask)}")

    def visual_token_count(self, feeds: dict[str, np.ndarray]) -> int:
        """Visual tokens the refined encoder gives for ``feeds`` (images or tiles times the tokens each
        gives, which the export wrote into the graph's metadata)."""
        if self._tokens_per_row is None:
            raise BundleError(f"{self.root}: the refined vision encoder takes no {VLM_REFINE_MASK}")
        return int(feeds["pixel_values"].shape[0]) * self._tokens_per_row

    def prefill_inputs(self, images: Sequence, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The processor's feeds (ids, mask, positions, pixels) plus the vision encoder's extra inputs."""
        if len(images) != len(texts) or not texts:
            raise InputError(f"{len(images)} images for {len(texts)} texts")
        batch = self.processor.prepare(list(images), list(texts))
        feeds = dict(batch)
        if self.name == "qwen2_5_vl":
            from .qwen_vision import qwen_vision_inputs

            feeds.update(qwen_vision_inputs(batch["image_grid_thw"], self.processor.config["vision_config"]))
        return feeds

    def generate(self, images: Sequence, texts: Sequence[str], *, refine: bool, max_new_tokens: int, min_new_tokens: int = 0,
                 refine_mask: np.ndarray | None = None, class_bias: np.ndarray | None = None):
        """New tokens [B, n] (n <= max_new_tokens) and stage timings in ms; as transformers' greedy
        ``generate`` with ``min_new_tokens``: the eos ids' logits are -inf before that many tokens."""
        ms: dict[str, float] = {}
        t0 = time.perf_counter()
        feeds = self.prefill_inputs(images, texts)
        seq, ctx = feeds["input_ids"].shape[1], self.context_length
        if ctx is not None and seq + max_new_tokens > ctx:  # refused before any graph runs, as the torch path does
            raise InputError(f"prompt of {seq} tokens plus {max_new_tokens} new tokens exceeds the model's context of {ctx} tokens")
        t1 = time.perf_counter()
        ms["prompt_build"] = (t1 - t0) * 1e3
        visual = self.vision_features(feeds, refine, refine_mask, class_bias)
        t2 = time.perf_counter()
        ms["vision_tower"] = (t2 - t1) * 1e3  # the adapter, when refining, runs inside this graph
        ids = feeds["input_ids"].astype(np.int64)
        mask = feeds["attention_mask"].astype(np.int64)
        (embeds,) = self.sessions[EMBED_TOKENS].run(list(VLM_EMBED_OUTPUTS), {VLM_EMBED_INPUTS[0]: ids})
        image = ids == int(self.record.image_token_id)
        if int(image.sum()) != visual.shape[0]:
            raise InputError(f"the prompt has {int(image.sum())} image positions, the vision encoder gave {visual.shape[0]} tokens")
        embeds[image] = visual.astype(embeds.dtype, copy=False)  # row-major, as masked_scatter
        B = ids.shape[0]
        positions = feeds["position_ids"].astype(np.int64)  # [B, S]; Qwen2.5-VL [3, B, S]
        deltas = feeds.get("rope_deltas") if self.position_rows == 3 else None
        cache = {n: np.zeros((B, self._kv_heads, 0, self._head_dim), dtype=self._cache_dtype) for n in self.past_inputs}
        eos = np.asarray(sorted(self.processor.eos_token_ids), dtype=np.int64)
        pad = self.processor.generation_pad_token_id  # what generate writes after a row has ended
        out: list[np.ndarray] = []
        unfinished = np.ones(B, dtype=bool)
        step_embeds = embeds
        dec = self.sessions[DECODER]
        wanted = [*VLM_DECODER_OUTPUTS, *self.present_outputs]
        embeds_in, mask_in, positions_in = VLM_DECODER_INPUTS
        t_first = None
        for step in range(max_new_tokens):
            res = dec.run(wanted, {embeds_in: step_embeds, mask_in: mask, positions_in: positions, **cache})
            logits = res[0][:, -1, :]
            if step < min_new_tokens and eos.size:
                logits = logits.copy()
                logits[:, eos] = -np.inf
            nxt = logits.argmax(axis=-1).astype(np.int64)
            if step == 0:
                t_first = time.perf_counter()
            if pad is not None:
                nxt = np.where(unfinished, nxt, int(pad))
            out.append(nxt)
            if eos.size:
                unfinished &= ~np.isin(nxt, eos)
            if not unfinished.any() or step + 1 == max_new_tokens:
                break
            cache = dict(zip(self.past_inputs, res[1:]))
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            (step_embeds,) = self.sessions[EMBED_TOKENS].run(list(VLM_EMBED_OUTPUTS), {VLM_EMBED_INPUTS[0]: nxt[:, None]})
            positions = step_position_ids(mask, deltas)
        t_end = time.perf_counter()
        ms["prefill"] = ((t_first or t_end) - t2) * 1e3
        steps = max(len(out) - 1, 1)
        ms["decode"] = (t_end - (t_first or t_end)) * 1e3
        ms["decode_per_token"] = ms["decode"] / steps
        ms["vlm_total"] = (t_end - t1) * 1e3
        return np.stack(out, axis=1), ms
