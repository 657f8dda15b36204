"""The layers of a Llama, one module each, forward and backward side by side.

Every layer file has the same three sections, in this order:

1. **reference** -- the maths in plain NumPy, in the CS231n pattern::

       out, cache = layer_forward_reference(inputs..., params...)
       d_inputs..., d_params... = layer_backward_reference(dout, cache)

   ``cache`` holds exactly what the backward needs.  npllama/reference.py composes these into the
   whole model.
2. **in place** -- what the engine calls (``*_kernel``, ``attention_forward``, ...): the same
   maths writing into buffers it is given (a residual add, in place or not, accumulate,
   positions as options): training and prompt prefill through the block of block.py, a decoding
   step on one row (``npllama.generate``; kv_cache.py holds what only decoding uses).
3. **kernel bodies** -- Numba functions (``*_rows``) that the in-place functions run on the
   threads (npllama/engine/pool.py); private, except the few that decode_step.py's one-kernel
   decoding step also calls on a row.

The machinery (threads, jit settings, SIMD tiles, matmul scheduling) is in npllama/engine/, which
these files import from and which never imports them.  Tests hold each kernel to its reference in
every way it is called; npllama/gradcheck.py wraps the kernels in allocating forward/backward
functions and checks them against finite differences.

Shapes: B batch, T sequence length, D model width, H query heads, K key/value heads, hd head
width, F feed-forward width, V vocabulary size, N = B*T rows.
"""
