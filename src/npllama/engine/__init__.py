"""npllama's engine: the machinery that makes the layers fast.  You never need this to learn the model.

The maths lives in npllama/layers/ (each layer's reference forward and backward, then the in-place
forward and backward the model calls) and in npllama/reference.py (the whole model in plain NumPy).
This package holds what makes the same maths run fast on a CPU: threads, compiler settings, SIMD
code, the scheduling of matrix products.  The layers import from here; nothing here imports a
layer (tests/test_imports.py holds the direction).

Module map (docs/engine.md says more):

    threads.py   npllama's thread count: ``set_threads`` / ``--threads`` / NPLLAMA_THREADS; the BLAS
                 under NumPy sized through threadpoolctl
    pool.py      npllama's helper threads; ``run_on_threads`` and ``claim_unit``: kernels whose units
                 of work the threads share; ``run_on_each_thread`` and ``meet``: one kernel on every
                 thread at once, its threads meeting between phases (a decoding step)
    addresses.py a table of arrays' addresses and ``matrix_at``: the weights of any model, float or
                 quantized, passed to one compiled kernel (the decoding step's)
    batch.py     the two regimes: a training step's batch parts, one per thread; the row split of
                 a forward, an evaluation or a prefill
    matmul.py    ``matmuls`` / ``split_matmuls``: a pass's products as single-threaded BLAS calls
                 spread over the threads
    blas.py      ``matmul_one_thread``: MKL's gemm through ctypes when the [mkl] extra is installed,
                 else NumPy's; ``sgemm_gflops``, the machine's float32 matrix-multiply rate now
    jit.py       the jit decorators every kernel uses, the CPU features LLVM compiles for, the
                 compile clock, the types of a kernel's versions (npllama/warmup.py compiles the
                 versions each module lists ahead)
    fastmath.py  ``fast_exp`` (Cephes' expf, vectorisable, for float32), vectorisable maxima
    simd.py      LLVM IR register tiles (``tile_update_*``) and row views for attention's kernels
    quantized.py products with a matrix kept in GGUF's quantized blocks (Q8_0 ... Q6_K): a
                 decoding step's matrix-vector kernels, panels dequantized for BLAS in a prompt

Importing this package loads nothing: each module is imported where it is used.
"""
