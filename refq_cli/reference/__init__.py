"""Reference-quantized recurrent modules.

Drop-in counterparts of ``torch.ao.nn.quantized.reference``'s RNN modules: same constructors,
``from_float``, getters and ``_get_name()`` strings, with PyTorch's defects fixed (``LSTM`` keeps
``proj_size``, ``RNN`` exists, ``quant_min``/``quant_max`` and ``is_decomposed`` are honoured) and
the fake-quantized weights cached between forward calls.
"""

from refq_cli.reference.cells import GRUCell, LSTMCell, RNNCell, RNNCellBase
from refq_cli.reference.sequence import GRU, LSTM, RNN, RNNBase

# The float module type each reference module stands for.
REFERENCE_TYPES = {cls._FLOAT_TYPE: cls for cls in (RNNCell, LSTMCell, GRUCell, RNN, LSTM, GRU)}

__all__ = [
    "GRU",
    "LSTM",
    "REFERENCE_TYPES",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "RNNBase",
    "RNNCell",
    "RNNCellBase",
]
