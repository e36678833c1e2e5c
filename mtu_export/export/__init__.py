"""Export of folded MTU tasks to on-device formats.

- `skeleton.py` the one export run (prepare, convert, validate, manifest, drift refusal, atomic write) that the
                ONNX, Core ML and Apple converters are handed to;
- `graphs.py`   the declarative I/O spec of every pipeline component (names, dynamic axes) and the thin
                modules that give each component the tensor-in / tensor-out signature the runtimes expect;
- `probes.py`   real inputs for validation: every graph input recorded along the task's own sampling trajectory;
- `runtime.py`  onnxruntime-backed text encoder, VAE and UNet with the interface the torch samplers use;
- `onnx.py`     `mtu-export onnx`: optimum's folder layout, a `task_id` bundle for all tasks, self-validation,
                `manifest.json` and ONNX metadata;
- `coreml.py`   `mtu-export coreml`: `.mlpackage` per component, a multifunction UNet for all tasks.

Modules here take nn.Modules and specs; they import fold, bundle, sample and quantize, never train, bench or cli.
Heavy backends (onnx, onnxruntime, coremltools) are imported inside the functions that use them.
"""
