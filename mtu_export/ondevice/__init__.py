"""The on-device runtime: what a phone or a bare server needs to sample from an exported ONNX folder with
onnxruntime, numpy, Pillow and `tokenizers` alone -- numpy schedulers (`schedulers.py`) and a CLIP tokenizer
(`tokenizer.py`).

Nothing in this subpackage may import torch, transformers or diffusers, not even indirectly (a test imports it in a
clean interpreter and checks `sys.modules`); heavy backends are imported inside the functions that need them.
"""
