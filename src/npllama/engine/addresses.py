"""Arrays a kernel reaches through a table of their addresses.

A decoding step compiled as one kernel (layers/decode_step.py) reads every weight of the model: per
layer six of them, of four shapes, each either a float array or a QuantizedMatrix's uint8 blocks.
Passed as arrays, they would make a tuple whose type (and so the compiled kernel) depends on the
number of layers and on which weights are quantized; a Numba typed List would need its own
compiling in every process.  Instead the kernel gets one int64 table, a row per array: its address,
rows and columns, and the kernel makes a view of it (``matrix_at``) where it needs it: one compiled
kernel per dtype, whatever the model.

The table holds no references: whoever builds it keeps the arrays alive as long as it is used
(``AddressTable`` does).
"""
import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from .jit import jit

ADDRESS, ROWS, COLUMNS = 0, 1, 2   # the columns of a table row that ``matrix_at`` reads


@intrinsic
def _pointer_to(typingctx, address, like):
    """The int64 ``address`` as a pointer to numbers of ``like``'s dtype (an array of that dtype)."""
    if not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)
    sig = pointer(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return sig, codegen


@jit
def matrix_at(table, i, like):
    """The C-contiguous (rows, columns) array of table row i, of ``like``'s dtype (a view: no copy)."""
    return numba.carray(_pointer_to(table[i, ADDRESS], like), (table[i, ROWS], table[i, COLUMNS]))


class AddressTable:
    """An int64 table (len(arrays), columns): per array its address, rows and columns (a 1-D array
    is one row), and ``extra`` numbers after them; it keeps the arrays alive."""

    def __init__(self, arrays, extra=None):
        self.arrays = [a if a.ndim == 2 else a.reshape(1, -1) for a in arrays]
        for a in self.arrays:
            if not a.flags.c_contiguous:
                raise ValueError(f"an array of shape {a.shape} in an address table is not C-contiguous")
        extra = [()] * len(arrays) if extra is None else extra
        width = 3 + max((len(e) for e in extra), default=0)
        self.table = np.zeros((len(arrays), width), dtype=np.int64)
        for i, (a, more) in enumerate(zip(self.arrays, extra)):
            self.table[i, :3] = (a.ctypes.data, a.shape[0], a.shape[1])
            self.table[i, 3:3 + len(more)] = more
