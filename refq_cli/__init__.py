"""refq: reference-quantized recurrent models.

Importing this package does not import torch; the submodules that need it
(`refq_cli.quant`, `refq_cli.reference`) do.
"""

__version__ = "0.1.0"
