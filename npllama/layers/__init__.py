"""The layers of a Llama, one module each, forward and backward side by side.

Every layer follows the CS231n pattern::

    out, cache = layer_forward(inputs..., params...)
    d_inputs..., d_params... = layer_backward(dout, cache)

``cache`` holds exactly what the backward needs; nothing is hidden in objects.  Layers on the hot
path (RMSNorm, RoPE, attention, SwiGLU, softmax cross-entropy) have two implementations side by
side: a readable NumPy ``*_reference`` that states the math, and a Numba kernel that the model
uses.  Tests hold the two equal and check both against finite differences.

Shapes: B batch, T sequence length, D model width, H query heads, K key/value heads, hd head
width, F feed-forward width, V vocabulary size, N = B*T rows.
"""
