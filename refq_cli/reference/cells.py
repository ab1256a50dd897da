"""Reference-quantized recurrent cells: RNNCell, LSTMCell, GRUCell.

One forward serves the three cells; they differ only in their gate count and in the PyTorch
kernel (``torch._VF.*_cell``) they call, the same kernels ``torch.nn``'s cells call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import _VF, Tensor, nn

from refq_cli.errors import QParamsError
from refq_cli.reference._weights import QuantizedWeightsMixin

_CELL_KERNELS = {
    "RNN_TANH": _VF.rnn_tanh_cell,
    "RNN_RELU": _VF.rnn_relu_cell,
    "LSTM": _VF.lstm_cell,
    "GRU": _VF.gru_cell,
}
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_WEIGHT_NAMES = ("weight_ih", "weight_hh")


class RNNCellBase(QuantizedWeightsMixin, nn.RNNCellBase):
    """Shared by the three cells: quantized ``weight_ih`` and ``weight_hh``, float biases."""

    _FLOAT_TYPE: ClassVar[type[nn.RNNCellBase]]
    _NAME: ClassVar[str]
    mode: str

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, _GATES[mode], device=device, dtype=dtype)
        self.mode = mode
        self._init_weight_qparams(_WEIGHT_NAMES, weight_qparams_dict, device)

    def _get_name(self) -> str:
        return self._NAME

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

    @classmethod
    def _config_of(cls, mod: nn.RNNCellBase) -> dict[str, Any]:
        return {"input_size": mod.input_size, "hidden_size": mod.hidden_size, "bias": mod.bias}

    @classmethod
    def from_float(
        cls,
        mod: nn.Module,
        weight_qparams_dict: Mapping[str, Any] | None,
        use_precomputed_fake_quant: bool = False,
    ) -> RNNCellBase:
        """A reference cell sharing ``mod``'s parameters, quantized as the dict says."""
        if not isinstance(mod, cls._FLOAT_TYPE):
            raise QParamsError(
                f"{cls.__name__}.from_float expects torch.nn.{cls._FLOAT_TYPE.__name__}, "
                f"got {type(mod).__name__}"
            )
        ref = cls(
            **cls._config_of(mod),
            device=mod.weight_ih.device,
            dtype=mod.weight_ih.dtype,
            weight_qparams_dict=weight_qparams_dict,
        )
        for name in ref._computation_names():
            setattr(ref, name, getattr(mod, name))
        return ref


class RNNCell(RNNCellBase):
    """Reference-quantized ``torch.nn.RNNCell`` (tanh or relu)."""

    _FLOAT_TYPE = nn.RNNCell
    _NAME = "QuantizedRNNCell(Reference)"

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
        super().__init__(
            f"RNN_{nonlinearity.upper()}",
            input_size,
            hidden_size,
            bias,
            device,
            dtype,
            weight_qparams_dict,
        )
        self.nonlinearity = nonlinearity

    @classmethod
    def _config_of(cls, mod: nn.RNNCellBase) -> dict[str, Any]:
        return {**super()._config_of(mod), "nonlinearity": mod.nonlinearity}


class LSTMCell(RNNCellBase):
    """Reference-quantized ``torch.nn.LSTMCell``."""

    _FLOAT_TYPE = nn.LSTMCell
    _NAME = "QuantizedLSTMCell(Reference)"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__("LSTM", input_size, hidden_size, bias, device, dtype, weight_qparams_dict)


class GRUCell(RNNCellBase):
    """Reference-quantized ``torch.nn.GRUCell``."""

    _FLOAT_TYPE = nn.GRUCell
    _NAME = "QuantizedGRUCell(Reference)"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__("GRU", input_size, hidden_size, bias, device, dtype, weight_qparams_dict)
