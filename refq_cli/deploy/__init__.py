"""Reference modules in deployment formats: ONNX (:mod:`refq_cli.deploy.onnx_graph` builds a
module's model, :mod:`refq_cli.deploy.onnx_files` writes an artifact's), what ``refq export``
and ``refq_cli.export`` write.

The opsets refq writes live here, torch-free, for the CLI's help.
"""

# Opsets whose models onnx's checker and onnxruntime's CPU provider were tested with.
# Per-axis DequantizeLinear needs opset 13; INT4 / UINT4 weights need 21.
SUPPORTED_OPSETS = range(13, 24)
DEFAULT_OPSET = 21
FOUR_BIT_OPSET = 21
