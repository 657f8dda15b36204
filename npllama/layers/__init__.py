"""The layers of a Llama, one module each, forward and backward side by side.

Every layer follows the CS231n pattern::

    out, cache = layer_forward(inputs..., params...)
    d_inputs..., d_params... = layer_backward(dout, cache)

``cache`` holds exactly what the backward needs, and a backward leaves it as it was.  Layers on
the hot path (RMSNorm, RoPE, attention, SwiGLU, softmax cross-entropy) have two implementations
side by side: a readable NumPy ``*_reference`` that states the math (npllama/reference.py composes
them into the whole model), and one Numba kernel per operation, with options (a residual add, in
place or not, accumulate, positions), which the layer functions wrap and which the fast engine
calls directly: training and prompt prefill through the block of block.py, a decoding step on one
row (``npllama.generate``; kv_cache.py holds the kernels only decoding uses).  Tests hold each
kernel to its reference in every way it is called and check the layer functions against finite
differences.

Shapes: B batch, T sequence length, D model width, H query heads, K key/value heads, hd head
width, F feed-forward width, V vocabulary size, N = B*T rows.
"""
