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


def check_opset(opset: object) -> int:
    """``opset`` if refq writes it, else ExportError naming the range (torch-free: checked
    before an artifact is read)."""
    from refq_cli.errors import ExportError, argument

    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"{argument('opset', opset)}: refq writes ONNX opsets {SUPPORTED_OPSETS[0]} to "
            f"{SUPPORTED_OPSETS[-1]} (per-axis DequantizeLinear needs {SUPPORTED_OPSETS[0]}, "
            f"4-bit weights {FOUR_BIT_OPSET})"
        )
    return opset
