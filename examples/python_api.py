"""Convert the bundled example model with the Python API and compare it with the float model.

Every recurrent weight gets int8 per-channel symmetric parameters from its min/max; the float
LSTM and GRUCell are swapped for refq's reference modules; both models run on the same input.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from model import CHECKPOINT, ExampleModel  # noqa: E402

from refq_cli import reference  # noqa: E402
from refq_cli.quant.numerics import DTYPES  # noqa: E402


def int8_symmetric_per_channel(weight: torch.Tensor) -> dict:
    qmax = DTYPES["qint8"].qmax
    scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / qmax
    return {"qscheme": "per_channel_symmetric", "dtype": "qint8", "scale": scale, "axis": 0}


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref - test).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise)) if noise > 0 else float("inf")


def main() -> None:
    console = Console()
    model = ExampleModel().eval()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True, mmap=True))
    quantized = ExampleModel().eval()
    quantized.load_state_dict(model.state_dict())

    table = Table(title=f"refq demo: {CHECKPOINT.name}, int8 per-channel symmetric")
    for column in ("module", "reference module", "weight", "scale min", "scale max"):
        table.add_column(column)
    for name, module in list(quantized.named_children()):
        ref_type = reference.REFERENCE_TYPES.get(type(module))
        if ref_type is None:
            continue
        weight_names = [n for n, _ in module.named_parameters() if n.startswith("weight")]
        qparams = {n: int8_symmetric_per_channel(getattr(module, n)) for n in weight_names}
        ref = ref_type.from_float(module, qparams)
        setattr(quantized, name, ref)
        for n in weight_names:
            scale = ref.weight_qparams(n).scale
            table.add_row(
                name,
                ref._get_name(),
                n,
                f"{scale.min():.3e}",
                f"{scale.max():.3e}",
            )
    console.print(table)

    torch.manual_seed(1)
    x = torch.randn(4, 25, 20)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    console.print(
        f"logits on a (4, 25, 20) input: max |float - quantized| = "
        f"{(expected - got).abs().max():.3e}, SQNR = {sqnr_db(expected, got):.1f} dB, "
        f"same top class for {int((expected.argmax(1) == got.argmax(1)).sum())}/4 inputs"
    )


if __name__ == "__main__":
    main()
