"""cotap.export: bundles to deployable models.

`bundle` (checkpoint -> bundle), `onnx` (bundle -> gated ONNX model in the bundle), `graph` (the
traced module and its size strategy), `quantize` (fp16/int8), `gate` (accuracy against torch fp32),
`fixtures` (gate and calibration images), `matching` (correspondence graph), `targets`,
`tensorrt` (engines), `batch` (a fleet of targets), `triton` (model repositories). See docs/export.md.
"""
