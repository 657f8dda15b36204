"""A whole decoding step as one kernel that every thread runs at once.

The step's maths is that of ``KVCacheDecoder.step`` (generate/decoding.py), layer after layer:

    xn = RMSNorm(x) w_attn                          qkv = W_qkv xn,  q, k rotated (RoPE at pos)
    k, v stored in the cache at pos                 o_h = attention(q_h, cache of kv head h // G)
    x  = x + W_o o                                  xn = RMSNorm(x) w_ffn
    x  = x + W_down swiglu(W_gate_up xn)
    and at the end  logits = W_out (RMSNorm(x) w_final)

with the same kernels on one row (``rmsnorm_forward_rows``, ``rope_rows``, ``swiglu_forward_rows``,
``decode_attention_kernel``, the matrix-vector rows of layers/kv_cache.py and engine/quantized.py).
What differs is who runs it.  A step of SmolLM2-135M is ~150 products of 25-120 us each; handed to
the threads one at a time (``run_on_threads``), each hand-over (the helper takes the GIL, calls
Numba's dispatcher, the two wait for each other) cost about as much as the second thread saved: on
2 threads the step ran 1.1x faster than on one.  Here the step is handed over once: every thread
runs ``decode_step_kernel`` (engine/pool.py's ``run_on_each_thread``), and within it each phase's
work is cut into units that the threads claim (``claim_unit``; a thread that starts late or is
descheduled takes fewer):

    phase                 unit                                        then
    q/k/v                 one head's hd rows of W_qkv; that thread    meet
                          rotates it (q, k) and stores it (k, v)
    attention             one query head                              meet
    W_o                   rows of W_o                                 meet
    W_gate_up             rows of W_gate_up                           meet
    W_down                rows of W_down                              meet
    output head           rows of W_out

and the threads meet (``meet``, a spin barrier) where the next phase needs all of this one's results:
five times a layer.  The row kernels between phases (RMSNorm, SwiGLU, the residual adds, the block
sums of x that formats with offsets need) are a few microseconds; each thread does them itself on its own copy of the residual
stream (the same numbers on every thread, by the same code), which costs less than another meeting.

Rows of a product are each one dot product whoever computes it, so the logits do not depend on the
thread count beyond the float matrices' summation order inside a unit of rows (units are cut by
the thread count); tests/test_decode_step.py holds them to the step of kernels and the reference.

The weights reach the kernel through one int64 table of addresses (engine/addresses.py), float
or quantized per matrix: one compiled kernel per dtype for every model (and one more with LoRA
adapters, which the kernel adds to the products as they are, s B (A x), no merged copy: each
thread computes A x itself, then adds s B (A x) to the rows of the product it computed).
"""
import numpy as np

from ..engine.addresses import ROWS, AddressTable, matrix_at
from ..engine.jit import INT, NONE, array, jit_rows_reassoc, scalar
from ..engine.pool import claim_unit, meet, run_on_each_thread
from ..engine.quantized import BLOCK, FORMAT_CODE, OFFSET_FORMATS, block_sums, quantized_rows
from ..engine.threads import get_threads
from .block import projection_columns
from .kv_cache import matvec_rows, decode_attention_kernel
from .rmsnorm import rmsnorm_forward_rows
from .rope import rope_rows
from .swiglu import swiglu_forward_rows

# The table's rows: six per layer, then the final norm and the output head.
ATTN_NORM, WQKV, WO, FFN_NORM, W_GATE_UP, W_DOWN = range(6)
PER_LAYER = 6
FORMAT = 3          # the table's column after address, rows, columns: FORMAT_CODE, or FLOAT
FLOAT = -1
OFFSET_CODES = sum(1 << FORMAT_CODE[f] for f in OFFSET_FORMATS)   # (a bit per format whose W x needs x's block sums)
# Units of a product's rows: about UNITS_PER_THREAD a thread (a thread that falls behind leaves the
# rest to the others), at least MIN_UNIT_ROWS rows (a claim is an atomic add on a line the threads
# share: ~0.1 us, against ~2 us for 64 rows of SmolLM2's Q4_1 matrices).
UNITS_PER_THREAD = 8
MIN_UNIT_ROWS = 32
# A model whose weights a step reads are fewer bytes than this runs its steps on one thread (its
# ~150 meetings a token would cost more than the second thread saves).
THREADS_MIN_WEIGHT_BYTES = 1 << 20
CLAIM_STRIDE = 8    # int64s between two counters of ``sync`` (one cache line each)
MAX_ADAPTERS = 3    # LoRA adapters on one product at most (q, k, v on W_qkv)


@jit_rows_reassoc
def _adapters_down(lora, i, x, thread):
    """t_k = A_k x for each LoRA adapter k of W (table row i), into this thread's row of lora's
    buffer (MAX_ADAPTERS slots of the rank): the first half of s B (A x)."""
    adapters, t = lora[1], lora[3][thread]
    rank = t.shape[0] // MAX_ADAPTERS
    for k in range(MAX_ADAPTERS):
        if adapters[i, k, 0] >= 0:
            a = matrix_at(lora[0], adapters[i, k, 0], x)
            for j in range(a.shape[0]):
                total = x.dtype.type(0.0)
                for d in range(a.shape[1]):
                    total += a[j, d] * x[d]
                t[k * rank + j] = total


@jit_rows_reassoc
def _adapters_up(lora, i, y, start, stop, thread):
    """y[row] += s B_k[row - c_k] . t_k for the rows start .. stop-1 that adapter k of W (table row
    i) writes (its columns c_k .. c_k + out_k - 1 of the product's output)."""
    adapters, scale, t = lora[1], lora[2], lora[3][thread]
    rank = t.shape[0] // MAX_ADAPTERS
    for k in range(MAX_ADAPTERS):
        if adapters[i, k, 0] >= 0:
            b = matrix_at(lora[0], adapters[i, k, 1], y)
            first = adapters[i, k, 2]
            for row in range(max(start, first), min(stop, first + b.shape[0])):
                total = y.dtype.type(0.0)
                for j in range(b.shape[1]):
                    total += b[row - first, j] * t[k * rank + j]
                y[row] += scale * total


@jit_rows_reassoc
def _product_rows(table, i, blocks_like, x, sums, y, start, stop):
    """y[start:stop] = those rows of W x, W table row i: float, or quantized when ``blocks_like`` is
    an array and the table says so (``sums``: x's block sums, for the formats with offsets)."""
    if blocks_like is not None and table[i, FORMAT] != FLOAT:
        quantized_rows(matrix_at(table, i, blocks_like), x, sums, y, table[i, FORMAT], start, stop)
    else:
        matvec_rows(matrix_at(table, i, x), x, y, start, stop)


@jit_rows_reassoc
def _block_sums_for(table, i, blocks_like, x, sums):
    """x's block sums into sums[:len(x) / 32] when W (table row i) is of a format with offsets
    (Q4_1, Q5_1, Q4_K, Q5_K: w = a c + o, so W x needs them)."""
    if blocks_like is not None and table[i, FORMAT] != FLOAT and (OFFSET_CODES >> table[i, FORMAT]) & 1:
        block_sums(x, sums[:x.shape[0] // BLOCK])


@jit_rows_reassoc
def _product_share(table, i, blocks_like, x, sums, y, sync, phase, n_threads, lora, thread):
    """y = W x over the units of rows this thread claims from counter ``phase`` (``_product_rows``;
    x's block sums first, into this thread's ``sums``, when W's format needs them), plus
    s B (A x) of W's LoRA adapters when ``lora`` is not None."""
    _block_sums_for(table, i, blocks_like, x, sums)
    if lora is not None:
        _adapters_down(lora, i, x, thread)
    rows = table[i, ROWS]
    per_unit = max(MIN_UNIT_ROWS, rows // (UNITS_PER_THREAD * n_threads))
    counter = sync[phase * CLAIM_STRIDE:phase * CLAIM_STRIDE + 1]
    while True:
        start = claim_unit(counter) * per_unit
        if start >= rows:
            break
        stop = min(rows, start + per_unit)
        _product_rows(table, i, blocks_like, x, sums, y, start, stop)
        if lora is not None:
            _adapters_up(lora, i, y, start, stop, thread)


@jit_rows_reassoc
def decode_step_kernel(table, blocks_like, lora, k_cache_t, v_cache, cos, sin, pos, n_heads, eps, x0,
                       qkv, attn, delta, gate_up, logits, own_x, own_xn, own_hidden, own_sums, own_scores,
                       own_counter, sync, thread, n_threads):
    """This thread's share of a decoding step at position ``pos`` of the token whose embedding is
    x0 (D,), the logits (V,) into ``logits``; every thread of ``n_threads`` runs it at once.

    table: (6 L + 2, 4) int64, the weights (``DecodeStep``); blocks_like: None for a model of float
    weights, else any uint8 2-D array (its type lets the quantized products be compiled); lora:
    None, or the LoRA adapters (``DecodeStep``: their address table, per table row of W up to
    MAX_ADAPTERS (A row, B row, first column), the scale, a (threads, MAX_ADAPTERS * rank) buffer);
    k_cache_t (L, K, hd, S), v_cache (L, K, S, hd): the cache, written at pos; cos, sin (S, hd/2);
    qkv, attn, delta, gate_up, logits: the buffers the threads share; own_*: a row per thread,
    own_x (D) the residual stream, own_xn (D), own_hidden (F), own_sums (>= F / 32), own_scores
    (S), own_counter (>= 1); sync: the threads' counters, zero before the step (meetings at 0,
    the phases' claims every CLAIM_STRIDE).  thread >= n_threads: returns at once."""
    if thread >= n_threads:
        return
    L, K, hd, _ = k_cache_t.shape
    H = n_heads
    G = H // K
    D = x0.shape[0]
    F = own_hidden.shape[1]
    one = x0.dtype.type(1.0)
    x, xn, hidden, sums, scores = own_x[thread], own_xn[thread], own_hidden[thread], own_sums[thread], own_scores[thread]
    x_row, xn_row = x.reshape((1, D)), xn.reshape((1, D))
    r = np.empty(1, dtype=x0.dtype)                            # (1/rms: not needed here)
    counter = own_counter[thread, 0:1]                         # (the row kernels' own unit counter)
    arrived = sync[0:1]
    meeting = 0
    phase = 0
    for d in range(D):
        x[d] = x0[d]
    for layer in range(L):
        w = layer * PER_LAYER
        k_t, v = k_cache_t[layer], v_cache[layer]
        counter[0] = 0
        rmsnorm_forward_rows(x_row, matrix_at(table, w + ATTN_NORM, x0)[0], eps, xn_row, r, None, None, counter)
        _block_sums_for(table, w + WQKV, blocks_like, xn, sums)
        if lora is not None:
            _adapters_down(lora, w + WQKV, xn, thread)
        # q/k/v a head at a time; the thread that computes a head rotates and stores it
        phase += 1
        while True:
            u = claim_unit(sync[phase * CLAIM_STRIDE:phase * CLAIM_STRIDE + 1])
            if u >= H + 2 * K:
                break
            _product_rows(table, w + WQKV, blocks_like, xn, sums, qkv, u * hd, (u + 1) * hd)
            if lora is not None:
                _adapters_up(lora, w + WQKV, qkv, u * hd, (u + 1) * hd, thread)
            heads = qkv[u * hd:(u + 1) * hd]
            if u < H + K:
                counter[0] = 0
                rope_rows(heads.reshape((1, hd)), 1, hd, cos, sin, one, pos, 1, counter)
            if H <= u < H + K:
                for d in range(hd):
                    k_t[u - H, d, pos] = heads[d]
            elif u >= H + K:
                for d in range(hd):
                    v[u - H - K, pos, d] = heads[d]
        meeting += 1
        meet(arrived, meeting, n_threads)
        # attention, a query head at a time
        phase += 1
        while True:
            h = claim_unit(sync[phase * CLAIM_STRIDE:phase * CLAIM_STRIDE + 1])
            if h >= H:
                break
            g = h // G
            decode_attention_kernel(qkv[h * hd:(h + 1) * hd].reshape((1, hd)), k_t[g:g + 1], v[g:g + 1], pos + 1,
                                    scores, attn[h * hd:(h + 1) * hd].reshape((1, hd)))
        meeting += 1
        meet(arrived, meeting, n_threads)
        # delta = W_o attn
        phase += 1
        _product_share(table, w + WO, blocks_like, attn, sums, delta, sync, phase, n_threads, lora, thread)
        meeting += 1
        meet(arrived, meeting, n_threads)
        # x = x + delta, xn = RMSNorm(x) w_ffn, gate_up = W_gate_up xn
        counter[0] = 0
        rmsnorm_forward_rows(x_row, matrix_at(table, w + FFN_NORM, x0)[0], eps, xn_row, r,
                             delta.reshape((1, D)), x_row, counter)
        phase += 1
        _product_share(table, w + W_GATE_UP, blocks_like, xn, sums, gate_up, sync, phase, n_threads, lora, thread)
        meeting += 1
        meet(arrived, meeting, n_threads)
        # delta = W_down swiglu(gate_up), then x = x + delta
        counter[0] = 0
        swiglu_forward_rows(gate_up.reshape((1, 2 * F)), hidden.reshape((1, F)), counter)
        phase += 1
        _product_share(table, w + W_DOWN, blocks_like, hidden, sums, delta, sync, phase, n_threads, lora, thread)
        meeting += 1
        meet(arrived, meeting, n_threads)
        for d in range(D):
            x[d] += delta[d]
    # logits = W_out RMSNorm(x) w_final
    w = L * PER_LAYER
    counter[0] = 0
    rmsnorm_forward_rows(x_row, matrix_at(table, w, x0)[0], eps, xn_row, r, None, None, counter)
    phase += 1
    _product_share(table, w + 1, blocks_like, xn, sums, logits, sync, phase, n_threads, lora, thread)


# ---- the step's tables and buffers, and its call -------------------------------------------------
ROLES = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")   # a layer's table rows, in order


ADAPTED = {WQKV: ("q_proj", "k_proj", "v_proj"), WO: ("o_proj",), W_GATE_UP: ("gate_proj", "up_proj"),
           W_DOWN: ("down_proj",)}    # the LoRA targets whose outputs are a product's columns


def _step_weights(model):
    """The weights in the table's order: ROLES for each layer, then the final norm and the output head."""
    return [layer[role] for layer in model.layers for role in ROLES] + [model.params["model.norm.weight"],
                                                                        model.lm_head]


def runs(model) -> bool:
    """Whether ``DecodeStep`` runs ``model``'s steps: every float weight and LoRA adapter
    C-contiguous in the model's dtype (as Llama keeps them)."""
    weights = _step_weights(model)
    if model.lora is not None:
        weights += [m for layer in model.lora_layers for pair in layer.values() for m in pair]
    return all(getattr(w, "quantized", False) or
               (isinstance(w, np.ndarray) and w.dtype == model.dtype and w.flags.c_contiguous) for w in weights)


def _lora_tables(model, n_rows):
    """The adapters as ``decode_step_kernel`` takes them: (their AddressTable, per table row of W
    up to MAX_ADAPTERS (A's row, B's row, W's first column), the scale, the rank)."""
    columns = projection_columns(model.config)
    arrays, index = [], np.full((n_rows, MAX_ADAPTERS, 3), -1, dtype=np.int64)
    for layer, adapters in enumerate(model.lora_layers):
        for role, targets in ADAPTED.items():
            for k, target in enumerate(t for t in targets if t in adapters):
                a, b = adapters[target]
                index[layer * PER_LAYER + role, k] = (len(arrays), len(arrays) + 1, columns[target].start or 0)
                arrays += [a, b]
    rank = max((a.shape[0] for a in arrays[::2]), default=1)
    return AddressTable(arrays), index, model.dtype.type(model.lora.scale), rank


class DecodeStep:
    """The decoding step of ``model`` over a cache (k_cache_t (L, K, hd, S), v_cache (L, K, S, hd))
    with RoPE tables cos, sin (S, hd/2): ``step(x0, pos, logits)`` runs ``decode_step_kernel`` on
    npllama's threads (one thread for a model whose weights are under THREADS_MIN_WEIGHT_BYTES)."""

    def __init__(self, model, k_cache_t, v_cache, cos, sin, eps):
        cfg, dt = model.config, model.dtype
        weights = _step_weights(model)
        arrays = [w.blocks if getattr(w, "quantized", False) else w for w in weights]
        formats = [(FORMAT_CODE[w.qtype],) if getattr(w, "quantized", False) else (FLOAT,) for w in weights]
        self.weights = AddressTable(arrays, formats)          # (keeps the arrays alive)
        self.blocks_like = np.empty((0, 0), dtype=np.uint8) if any(f[0] != FLOAT for f in formats) else None
        self.weight_bytes = sum(a.nbytes for a in arrays)
        self.lora = None if model.lora is None else _lora_tables(model, len(weights))
        self.cache = (k_cache_t, v_cache, cos, sin)
        self.n_heads, self.eps = cfg.n_heads, eps
        D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
        e = lambda *shape: np.empty(shape, dtype=dt)  # noqa: E731
        self.shared = (e((cfg.n_heads + 2 * cfg.n_kv_heads) * hd), e(cfg.n_heads * hd), e(D), e(2 * F))
        self.sync = np.zeros(CLAIM_STRIDE * (5 * cfg.n_layers + 2), dtype=np.int64)
        self.lora_arg = None
        self.dtype, self.widths, self.own = dt, (D, D, F, max(D, F, cfg.n_heads * hd) // BLOCK + 1,
                                                  k_cache_t.shape[-1]), None

    def _own(self, n_threads):
        """The threads' own buffers (x, xn, hidden, sums, scores, a counter), a row per thread, and
        the adapters' argument (with a row per thread for their A x)."""
        if self.own is None or self.own[0].shape[0] < n_threads:
            self.own = tuple(np.empty((n_threads, w), dtype=self.dtype) for w in self.widths) + (
                np.zeros((n_threads, CLAIM_STRIDE), dtype=np.int64),)
            if self.lora is not None:
                table, index, scale, rank = self.lora
                self.lora_arg = (table.table, index, scale, np.empty((n_threads, MAX_ADAPTERS * rank), self.dtype))
        return self.own

    def threads(self) -> int:
        return get_threads() if self.weight_bytes >= THREADS_MIN_WEIGHT_BYTES else 1

    def step(self, x0, pos, logits):
        """logits (V,) of the token whose embedding is x0 (D,), at position ``pos`` (its key and value
        stored in the cache there)."""
        n = self.threads()
        k_cache_t, v_cache, cos, sin = self.cache
        self.sync.fill(0)
        own = self._own(n)
        run_on_each_thread(decode_step_kernel, self.weights.table, self.blocks_like, self.lora_arg, k_cache_t,
                           v_cache, cos, sin, pos, self.n_heads, self.eps, x0, *self.shared, logits, *own, self.sync,
                           n_threads=n)
        return logits


# ---- the versions a training run calls (npllama/warmup.py compiles them ahead) -------------------
def kernel_versions(dtype):
    """A decoding step's of a float model (a training run's samples)."""
    row, rows, cache, table = array(dtype, 1), array(dtype, 2), array(dtype, 4), array(np.int64, 2)
    return [(decode_step_kernel, (table, NONE, NONE, cache, cache, rows, rows, INT, INT, scalar(dtype), row,
                                  row, row, row, row, row, rows, rows, rows, rows, rows, table,
                                  array(np.int64, 1), INT, INT))]
