"""Reference-quantized multi-layer recurrent modules: RNN, LSTM, GRU.

One forward serves the three; it calls the same kernels as ``torch.nn`` (``torch._VF.lstm``,
``gru``, ``rnn_tanh``, ``rnn_relu``) with the fake-quantized weights in place of the float ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import _VF, Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from refq_cli.reference._weights import QuantizedWeightsMixin

_KERNELS = {
    "RNN_TANH": _VF.rnn_tanh,
    "RNN_RELU": _VF.rnn_relu,
    "LSTM": _VF.lstm,
    "GRU": _VF.gru,
}


class RNNBase(QuantizedWeightsMixin, nn.RNNBase):
    """Shared by RNN, LSTM and GRU: every ``weight_*`` quantized, biases float."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            mode,
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
        )
        weight_names = [n for n in self._flat_weights_names if n.startswith("weight")]
        self._init_weight_qparams(weight_names, weight_qparams_dict, device)

    def _computation_names(self) -> list[str]:
        return self._flat_weights_names

    def get_flat_weights(self) -> list[Tensor | None]:
        """Weights (fake-quantized) and biases in the order the kernels take them."""
        return list(self._computation_weights())

    def _arrange_for_kernels(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        """On CUDA, copies of the tensors in one buffer, in cuDNN's layout.

        ``nn.RNNBase.flatten_parameters`` does this for float weights: given tensors that are
        views of one such buffer, cuDNN reads them in place; given separate tensors, it copies
        them into a new buffer on every forward. The same conditions as PyTorch's apply.
        """
        first = tensors[0] if tensors else None
        if (
            first is None
            or not all(t is not None and t.is_cuda and t.dtype == first.dtype for t in tensors)
            or not torch.backends.cudnn.is_acceptable(first)
            or not torch._use_cudnn_rnn_flatten_weight()
        ):
            return tensors
        from torch.backends.cudnn import rnn as cudnn_rnn

        copies = [t.detach().clone() for t in tensors]  # type: ignore[union-attr]
        per_layer = (4 if self.bias else 2) + (1 if self.proj_size > 0 else 0)
        with torch.cuda.device_of(first), torch.no_grad():
            # rebinds each copy to a view of the new buffer
            torch._cudnn_rnn_flatten_weight(
                copies,
                per_layer,
                self.input_size,
                cudnn_rnn.get_cudnn_mode(self.mode),
                self.hidden_size,
                self.proj_size,
                self.num_layers,
                self.batch_first,
                bool(self.bidirectional),
            )
        return list(copies)

    def get_quantized_weight_bias_dict(self) -> dict[str, Any]:
        """Per flat weight name: a ``QuantizedWeight`` for weights, the float tensor for biases."""
        return {name: self.get_quantized_weight(name) for name in self._flat_weights_names}

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
            batched = True
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: Expected input to be 2D or 3D, "
                    f"got {input.dim()}D tensor instead"
                )
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not batched:
                input = input.unsqueeze(batch_dim)
            batch = input.size(batch_dim)

        if hx is None:
            hx = self._zero_state(batch, input)
        else:
            states = tuple(hx) if is_lstm else (hx,)
            want = 3 if batched else 2
            if any(s.dim() != want for s in states):
                dims = ", ".join(f"{s.dim()}-D" for s in states)
                raise RuntimeError(
                    f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx should "
                    f"also be {want}-D but got ({dims}) tensors"
                )
            if not batched:
                states = tuple(s.unsqueeze(1) for s in states)
            hx = self.permute_hidden(states if is_lstm else states[0], sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)

        weights = self._computation_weights()
        config = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        kernel = _KERNELS[self.mode]
        if packed:
            result = kernel(input, batch_sizes, hx, weights, *config)
        elif self._exported_in_a_loop(input):
            result = _projected_lstm(input, hx, weights, self)
        else:
            result = kernel(input, hx, weights, *config, self.batch_first)
        output, hidden = result[0], (tuple(result[1:]) if is_lstm else result[1])

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden) if is_lstm else hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _exported_in_a_loop(self, input: Tensor) -> bool:
        """Whether export records this forward as :func:`_projected_lstm`: an LSTM with
        projections on the CPU, without dropout, where this PyTorch has ``torch.while_loop``."""
        return (
            self.proj_size > 0
            and torch.compiler.is_exporting()
            and input.device.type == "cpu"
            and not (self.training and self.dropout > 0)
            and hasattr(torch, "while_loop")
        )

    def _zero_state(self, batch: int, input: Tensor) -> Any:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        h_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(layers, batch, h_size, dtype=input.dtype, device=input.device)
        if self.mode != "LSTM":
            return h
        c = torch.zeros(layers, batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return (h, c)

    def check_forward_args(self, input: Tensor, hidden: Any, batch_sizes: Any) -> None:
        self.check_input(input, batch_sizes)
        if self.mode != "LSTM":
            self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))
            return
        expected_h = self.get_expected_hidden_size(input, batch_sizes)
        expected_c = (*expected_h[:2], self.hidden_size)
        self.check_hidden_size(hidden[0], expected_h, "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], expected_c, "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx: Any, permutation: Tensor | None) -> Any:
        if permutation is None:
            return hx
        if isinstance(hx, tuple):
            return tuple(h.index_select(1, permutation) for h in hx)
        return hx.index_select(1, permutation)


class RNN(RNNBase):
    """Reference-quantized ``torch.nn.RNN`` (tanh or relu), which PyTorch's reference set lacks."""

    _FLOAT_TYPE = nn.RNN
    _NAME = "QuantizedRNN(Reference)"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight_qparams_dict: Mapping[str, Any] | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: unknown nonlinearity {nonlinearity!r}; use tanh or relu")
        super().__init__(
            f"RNN_{nonlinearity.upper()}",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            weight_qparams_dict=weight_qparams_dict,
        )
        self.nonlinearity = nonlinearity


class LSTM(RNNBase):
    """Reference-quantized ``torch.nn.LSTM``, ``proj_size`` included."""

    _FLOAT_TYPE = nn.LSTM
    _NAME = "QuantizedLSTM(Reference)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("LSTM", *args, **kwargs)


class GRU(RNNBase):
    """Reference-quantized ``torch.nn.GRU``."""

    _FLOAT_TYPE = nn.GRU
    _NAME = "QuantizedGRU(Reference)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


def _projected_lstm(
    input: Tensor, hx: tuple[Tensor, Tensor], weights: list[Tensor], module: RNNBase
) -> tuple[Tensor, Tensor, Tensor]:
    """What ``_VF.lstm`` computes for an LSTM with projections on the CPU, layer by layer and
    step by step in ``torch.while_loop``, op for op as PyTorch's own loop does (the same
    outputs, bit for bit): what tracing records in place of ``aten.lstm``, which PyTorch's ONNX
    exporter cannot lower with projections. The sequence length stays dynamic."""
    x = input.transpose(0, 1) if module.batch_first else input
    directions = 2 if module.bidirectional else 1
    per_layer = 5 if module.bias else 3  # w_ih, w_hh, (b_ih, b_hh,) w_hr
    states_h, states_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k * per_layer : (k + 1) * per_layer]
            biases = (w[2], w[3]) if module.bias else (None, None)
            out, h, c = _projected_layer(
                x, hx[0][k], hx[1][k], w[0], w[1], *biases, w[-1], reverse=direction == 1
            )
            outputs.append(out)
            states_h.append(h)
            states_c.append(c)
        x = torch.cat(outputs, 2) if directions == 2 else outputs[0]
    output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.stack(states_h), torch.stack(states_c)


def _projected_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer: the input's share of the gates for the whole sequence at
    once, then each step (backwards for ``reverse``) as PyTorch's LSTM cell computes it."""
    steps = x.size(0)
    input_gates = F.linear(x, w_ih, b_ih)

    def more(t: Tensor, h: Tensor, c: Tensor, out: Tensor) -> Tensor:
        return t < steps

    def step(t: Tensor, h: Tensor, c: Tensor, out: Tensor) -> tuple[Tensor, ...]:
        at = (steps - 1 - t if reverse else t).reshape(1)
        gates = F.linear(h, w_hh, b_hh).add(input_gates.index_select(0, at).squeeze(0))
        i, f, g, o = gates.chunk(4, 1)
        c = (f.sigmoid() * c).add(i.sigmoid() * g.tanh())
        h = torch.matmul(o.sigmoid() * c.tanh(), w_hr.t())
        return t + 1, h, c, out.index_copy(0, at, h.unsqueeze(0))

    start = torch.zeros((), dtype=torch.int64, device=x.device)
    out = x.new_zeros(steps, h.size(0), h.size(1))
    _, h, c, out = torch.while_loop(more, step, (start, h, c, out))
    return out, h, c
