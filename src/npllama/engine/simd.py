"""SIMD code LLVM would not write from loops: a BLAS-style register tile, a contiguous row view,
a vector maximum.  LLVM IR, emitted through Numba intrinsics; attention's kernels (layers/attention.py,
layers/kv_cache.py) call them.

``contiguous_row`` uses Numba internals with the Numba versions tested (pyproject pins them), and a
plain slice with any other.
"""
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import HOST_HAS_AVX512, jit

# ---- a register tile of a matrix product ----------------------------------------------------------
# Attention multiplies many small tiles (128 x 128 x head_dim).  Written as loops, LLVM vectorises
# the innermost one but keeps the output in memory: every multiply-add loads and stores C, and each
# short row pays for its loop set-up and alias checks (~55-80 GFLOP/s on one AVX-512 core).
# ``tile_update`` is the micro-kernel of a BLAS instead, written in LLVM IR: an MR x (width
# vectors) block of C stays in registers while the sum runs over k, each step loading `width`
# vectors of a row of B and MR numbers of a column of A (each broadcast to a vector) for MR * width
# fused multiply-adds (~150 GFLOP/s for float32 on the same core).
VECTOR_BYTES = 64 if HOST_HAS_AVX512 else 32
# Rows of C per tile: 8 x 2 vectors are 16 accumulators, half of AVX-512's 32 registers (each step
# of the sum then loads 2 vectors and 8 numbers for 16 multiply-adds); AVX2 has 16 registers: 4 rows.
MR = 8 if VECTOR_BYTES == 64 else 4


def splat(builder, value, vector_type):
    """A vector of ``vector_type`` holding ``value`` in every lane (LLVM IR)."""
    undef = ir.Constant(vector_type, ir.Undefined)
    lane0 = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count),
                                                            [0] * vector_type.count))


def _element_address(builder, data, strides, indices):
    """The byte address (i8*) of the element at ``indices`` of an array with ``data`` and byte
    ``strides`` (LLVM IR; as many indices as leading strides used)."""
    offset = builder.mul(indices[0], strides[0])
    for index, stride in zip(indices[1:], strides[1:]):
        offset = builder.add(offset, builder.mul(index, stride))
    return builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [offset])


def _tile_update(width, vector_bytes=VECTOR_BYTES, pairs=False, rows=MR):
    @intrinsic
    def tile_update(typingctx, A, a_row, a_col, B, b_row, b_col, C, c_row, c_col, k, accumulate):
        """C[c_row + i, c_col + j] (+)= sum_{d < k} A[a_row + i, a_col + d] B[b_row + d, b_col + j]
        for i < rows (MR unless given), j < width * lanes (lanes = vector_bytes / itemsize).  A: any strides; the rows of
        B and C must be contiguous.  accumulate=False: C = the product.

        pairs=True (``tile_update_pairs``): the sum runs over 2k columns of A, two at a time:
        C[c_row + i, c_col + j] (+)= sum_{d < k} A[a_row + i, a_col + 2d + j % 2] B[b_row + d, b_col + j],
        the two numbers of A one 64-bit load broadcast to every pair of lanes (A's rows must then be
        contiguous too)."""
        i = types.intp
        sig = types.void(A, i, i, B, i, i, C, i, i, i, types.boolean)

        def codegen(context, builder, signature, args):
            A_, a_row, a_col, B_, b_row, b_col, C_, c_row, c_col, k, accumulate = args
            elt = context.get_value_type(signature.args[0].dtype)
            itemsize = context.get_abi_sizeof(elt)
            lanes = vector_bytes // itemsize
            vec, i64 = ir.VectorType(elt, lanes), ir.IntType(64)
            pair = ir.VectorType(elt, 2)
            pair_lanes = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [j % 2 for j in range(lanes)])

            def origin(index, value, row, col):      # (byte address of element [row, col], row stride)
                arr = context.make_array(signature.args[index])(context, builder, value)
                s0, s1 = cgutils.unpack_tuple(builder, arr.strides, 2)
                return _element_address(builder, arr.data, (s0, s1), (row, col)), s0, s1

            def at(base, offset, ty):                # ty* at base + offset bytes
                return builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())

            a0, a_s0, a_s1 = origin(0, A_, a_row, a_col)
            b0, b_s0, _ = origin(3, B_, b_row, b_col)
            c0, c_s0, _ = origin(6, C_, c_row, c_col)
            row_offset = lambda stride, r: builder.mul(stride, ir.Constant(i64, r))  # noqa: E731
            vector_offset = lambda v: ir.Constant(i64, v * vector_bytes)           # noqa: E731
            c_vectors = [[at(builder.gep(c0, [row_offset(c_s0, r)]), vector_offset(v), vec) for v in range(width)]
                         for r in range(rows)]
            acc = [[cgutils.alloca_once(builder, vec) for _ in range(width)] for _ in range(rows)]
            for r in range(rows):
                for v in range(width):
                    start = builder.select(accumulate, builder.load(c_vectors[r][v], align=itemsize),
                                           ir.Constant(vec, None))
                    builder.store(start, acc[r][v])
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                                 f"llvm.fma.v{lanes}f{itemsize * 8}")
            with cgutils.for_range(builder, k) as loop:
                d = loop.index
                b_row_d = builder.gep(b0, [builder.mul(d, b_s0)])
                b_vectors = [builder.load(at(b_row_d, vector_offset(v), vec), align=itemsize) for v in range(width)]
                a_column_d = builder.gep(a0, [builder.mul(builder.shl(d, ir.Constant(i64, 1)) if pairs else d, a_s1)])
                for r in range(rows):
                    if pairs:
                        two = builder.load(at(a_column_d, row_offset(a_s0, r), pair), align=itemsize)
                        a = builder.shuffle_vector(two, ir.Constant(pair, ir.Undefined), pair_lanes)
                    else:
                        a = splat(builder, builder.load(at(a_column_d, row_offset(a_s0, r), elt)), vec)
                    for v in range(width):
                        builder.store(builder.call(fma, [a, b_vectors[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(rows):
                for v in range(width):
                    builder.store(builder.load(acc[r][v]), c_vectors[r][v], align=itemsize)
            return context.get_dummy_value()
        return sig, codegen
    return tile_update


# Two variants, each kept because a whole step of a benchmarked model measured >= 3 % slower
# without it (benchmarks/README.md); head widths they do not cover are padded to whole tiles of two
# vectors (layers/attention.py ``_head_width``).  (One vector, half a vector and three vectors went:
# no benchmarked model uses the first two, and 15M-v4k's step was no slower without the third.)
tile_update_2 = _tile_update(2)       # MR x two vectors
# MR x one vector of interleaved pairs: a product whose C is half a vector wide (attention's P V and
# dS K at head_dim <= 8 in float32) as one of full vectors over half as many steps (attention.py, above
# _add_lower_times)
tile_update_pairs = _tile_update(1, pairs=True)
# 12 rows and 1 row by two vectors: the quantized matrix-matrix product of a prompt (engine/quantized.py:
# x's rows, 12 at a time -- 24 accumulators, ~10 % faster than 8 on SmolLM2's shapes -- then 8, then one).
tile_update_12 = _tile_update(2, rows=12)
tile_update_1 = _tile_update(2, rows=1)


# ``contiguous_row`` builds an array view in LLVM IR with two Numba internals (``populate_array``,
# ``impl_ret_borrowed``), which move between Numba's versions: it is used with the Numba versions
# tested (pyproject pins them), and any other Numba gets the plain slice x[i, j, k] instead (the
# same values; LLVM then computes the row's addresses from its strides, and attention's row loops
# stay scalar where the array is a strided view).  tests/test_attention_kernels.py runs both.
TESTED_NUMBA = {(0, 68)}
try:
    from numba.core.imputils import impl_ret_borrowed
    from numba.np.arrayobj import populate_array
except ImportError:        # (a Numba whose internals moved)
    impl_ret_borrowed = populate_array = None
USE_NUMBA_INTERNALS = populate_array is not None and tuple(numba.version_info[:2]) in TESTED_NUMBA


@intrinsic
def _contiguous_row_view(typingctx, x, i, j, k):
    """x[i, j, k, :] of a 4-D array as a C-contiguous 1-D view (x's last axis must be contiguous:
    the caller checks).  Attention's inputs are strided views of the model's row buffers, which
    Numba types as of any layout: the loops over their rows then compute every address from the
    strides and stay scalar; over this view they are vector loops."""
    if not (isinstance(x, types.Array) and x.ndim == 4):
        return None
    row_type = types.Array(x.dtype, 1, "C")
    sig = row_type(x, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        strides = cgutils.unpack_tuple(builder, arr.strides, 4)
        shape = cgutils.unpack_tuple(builder, arr.shape, 4)
        data = builder.bitcast(_element_address(builder, arr.data, strides[:3], args[1:4]), arr.data.type)
        row = context.make_array(row_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(x.dtype)))
        populate_array(row, data=data, shape=[shape[3]], strides=[itemsize], itemsize=itemsize,
                       meminfo=arr.meminfo, parent=arr.parent)
        return impl_ret_borrowed(context, builder, row_type, row._getvalue())
    return sig, codegen


@jit
def _row_slice(x, i, j, k):
    """x[i, j, k] (the plain fallback of ``contiguous_row``)."""
    return x[i, j, k]


contiguous_row = _contiguous_row_view if USE_NUMBA_INTERNALS else _row_slice


@intrinsic
def vector_max(typingctx, x, n):
    """max(x[:n]) (n >= 1) in whole vectors: x, contiguous, must have room up to n rounded up to whole
    vectors (lanes = VECTOR_BYTES / itemsize); what lies past n there is read but ignored.  With
    "nnan" on the maxima, as ``array_max`` has: a NaN in x may be skipped or returned (callers
    exponentiate x afterwards, and the exp of that element carries the NaN into their result).
    In attention's softmax ``array_max`` ran as one scalar chain of maxima (~4 cycles a number: a
    quarter of the forward's time at the default model's shape)."""
    sig = x.dtype(x, types.intp)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        n = args[1]
        elt = context.get_value_type(signature.args[0].dtype)
        itemsize = context.get_abi_sizeof(elt)
        lanes = VECTOR_BYTES // itemsize
        vec, i64 = ir.VectorType(elt, lanes), ir.IntType(64)
        index_vec = ir.VectorType(i64, lanes)
        lowest = ir.Constant(vec, [float("-inf")] * lanes)
        maxnum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec]),
                                                f"llvm.maxnum.v{lanes}f{itemsize * 8}")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(elt, [vec]),
                                                f"llvm.vector.reduce.fmax.v{lanes}f{itemsize * 8}")
        offsets, limit = ir.Constant(index_vec, list(range(lanes))), splat(builder, n, index_vec)
        acc = cgutils.alloca_once_value(builder, lowest)
        n_vectors = builder.sdiv(builder.add(n, ir.Constant(i64, lanes - 1)), ir.Constant(i64, lanes))
        data = builder.bitcast(arr.data, vec.as_pointer())
        with cgutils.for_range(builder, n_vectors) as loop:
            values = builder.load(builder.gep(data, [loop.index]), align=itemsize)
            index = builder.add(splat(builder, builder.mul(loop.index, ir.Constant(i64, lanes)), index_vec), offsets)
            values = builder.select(builder.icmp_signed("<", index, limit), values, lowest)
            builder.store(builder.call(maxnum, [builder.load(acc), values], fastmath=("nnan",)), acc)
        return builder.call(reduce, [builder.load(acc)], fastmath=("nnan",))
    return sig, codegen
