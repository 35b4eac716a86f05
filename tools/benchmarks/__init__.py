"""Development benchmarks (not tests, not product commands): numbers behind the README's Benchmarks section.

- ``graphs``: the exported detector and adapter graphs, PyTorch eager vs ONNX Runtime fp32/int8
  (``rtrt bench --graphs`` runs it; ``python -m rtrt.tools.benchmarks.graphs``);
- ``scaling``: the plug-in's overhead against bigger random language models
  (``python -m rtrt.tools.benchmarks.scaling``);
- ``training``: phase-1 and phase-2 training throughput and peak memory
  (``python -m rtrt.tools.benchmarks.training``).
"""
