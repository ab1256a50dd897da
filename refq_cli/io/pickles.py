"""A check on pickles refq did not write, made before anything unpickles them.

Python hashes an integer ``n`` as ``n mod (2**61 - 1)``, so integers that differ by multiples of
that modulus all collide: a file of a few hundred kilobytes can hold tens of thousands of
dictionary keys that take minutes to insert, whichever unpickler builds the dictionary (torch's
``weights_only`` one or refq's own). Two distinct colliding numbers cannot both be small, so a
pickle with many numbers of magnitude 2**60 or more is refused; real checkpoints hold a few at
most (a seed, a legacy file's magic number). Plain Python: importing this does not import torch.
"""

from __future__ import annotations

import math
import pickletools
from typing import BinaryIO

HUGE = 2**60  # magnitude from which numbers can collide in hash with many others
MAX_HUGE_NUMBERS = 1000  # a flood needs many more: 1,000 colliding keys cost milliseconds
_NUMBERS = {"INT", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}


def count_huge_numbers(stream: BinaryIO, pickles: int = 1) -> int:
    """How many numbers of magnitude :data:`HUGE` or more the next ``pickles`` pickles in
    ``stream`` hold. Stops early past :data:`MAX_HUGE_NUMBERS`, and at a pickle it cannot
    parse (whatever unpickles it next will refuse it)."""
    count = 0
    try:
        for _ in range(pickles):
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in _NUMBERS and _huge(arg):
                    count += 1
                    if count > MAX_HUGE_NUMBERS:
                        return count
    except Exception:  # a broken pickle: its reader says what is wrong with it
        pass
    return count


def _huge(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) >= HUGE
    return isinstance(value, int) and abs(value) >= HUGE
