"""Reference-quantized recurrent cells: RNNCell, LSTMCell, GRUCell.

One forward serves the three cells; they differ only in their gate count and in the PyTorch
kernel (``torch._VF.*_cell``) they call, the same kernels ``torch.nn``'s cells call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import _VF, Tensor, nn

from refq_cli.reference._weights import QuantizedWeightsMixin

_CELL_KERNELS = {
    "RNN_TANH": _VF.rnn_tanh_cell,
    "RNN_RELU": _VF.rnn_relu_cell,
    "LSTM": _VF.lstm_cell,
    "GRU": _VF.gru_cell,
}
_WEIGHT_NAMES = ("weight_ih", "weight_hh")


class RNNCellBase(QuantizedWeightsMixin, nn.RNNCellBase):
    """Shared by the three cells: quantized ``weight_ih`` and ``weight_hh``, float biases.

    A cell class names its gate count (``_GATES``) and its kernel (``mode``).
    """

    _GATES: ClassVar[int]
    mode: str

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, self._GATES, device=device, dtype=dtype)
        self._init_weight_qparams(_WEIGHT_NAMES, weight_qparams_dict, device)

    def _computation_names(self) -> tuple[str, ...]:
        return ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def get_weight_ih(self) -> Tensor:
        return self.get_weight("weight_ih")

    def get_weight_hh(self) -> Tensor:
        return self.get_weight("weight_hh")

    def get_quantized_weight_ih(self) -> Any:
        return self.get_quantized_weight("weight_ih")

    def get_quantized_weight_hh(self) -> Any:
        return self.get_quantized_weight("weight_hh")

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{type(self).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        batched = input.dim() == 2
        is_lstm = self.mode == "LSTM"
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            hx = (zeros, zeros) if is_lstm else zeros
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if is_lstm else hx.unsqueeze(0)
        out = _CELL_KERNELS[self.mode](input, hx, *self._computation_weights())
        if not batched:
            out = (out[0].squeeze(0), out[1].squeeze(0)) if is_lstm else out.squeeze(0)
        return out


class RNNCell(RNNCellBase):
    """Reference-quantized ``torch.nn.RNNCell`` (tanh or relu)."""

    _FLOAT_TYPE = nn.RNNCell
    _NAME = "QuantizedRNNCell(Reference)"
    _GATES = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: unknown nonlinearity {nonlinearity!r}; use tanh or relu")
        super().__init__(input_size, hidden_size, bias, device, dtype, weight_qparams_dict)
        self.nonlinearity = nonlinearity

    @property
    def mode(self) -> str:  # type: ignore[override]
        return f"RNN_{self.nonlinearity.upper()}"


class LSTMCell(RNNCellBase):
    """Reference-quantized ``torch.nn.LSTMCell``."""

    _FLOAT_TYPE = nn.LSTMCell
    _NAME = "QuantizedLSTMCell(Reference)"
    _GATES = 4
    mode = "LSTM"


class GRUCell(RNNCellBase):
    """Reference-quantized ``torch.nn.GRUCell``."""

    _FLOAT_TYPE = nn.GRUCell
    _NAME = "QuantizedGRUCell(Reference)"
    _GATES = 3
    mode = "GRU"
