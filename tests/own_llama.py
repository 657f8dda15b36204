"""A Llama of "a user's own", in NumPy, forward and backward by hand, sharing no code with npllama.

It makes the layout choices of a real implementation -- Meta's names ("layers.0.attention.wqkv"),
q/k/v fused into one weight and gate/up into another, w2 stored transposed, and optionally Meta's
interleaved RoPE with its row order -- so that ``MAP`` (and ``META_ROPE_MAP``) exercise every kind
of rule of `npllama compare --map`.  ``bugs`` plants the mistakes of issue 27:

    rope_interleaved       RoPE on pairs (x0, x1), (x2, x3), ... of Hugging Face-ordered weights
    scale_1_over_hd        scores scaled by 1/hd instead of 1/sqrt(hd)
    gqa_tile               key/value heads repeated as a tile (np.tile) instead of each in turn
    eps_outside_sqrt       RMSNorm x / (sqrt(mean(x^2)) + eps)
    swiglu_no_sigma_prime  SwiGLU's backward without silu's sigma' term: da = dh u sigma(a)
"""
import numpy as np

BUGS = ("rope_interleaved", "scale_1_over_hd", "gqa_tile", "eps_outside_sqrt", "swiglu_no_sigma_prime")

MAP = [
    {"match": r"^tok_embeddings(\.weight)?$", "rename": r"model.embed_tokens\1"},
    {"match": r"^norm(\.weight)?$", "rename": r"model.norm\1"},
    {"match": r"^output(\.weight)?$", "rename": r"lm_head\1"},
    {"match": r"^layers\.(\d+)\.x$", "rename": r"model.layers.\1.resid_pre"},
    {"match": r"^layers\.(\d+)\.h$", "rename": r"model.layers.\1.resid_mid"},
    {"match": r"^layers\.(\d+)\.out$", "rename": r"model.layers.\1.resid_post"},
    {"match": r"^layers\.(\d+)\.attention_norm(\.weight)?$", "rename": r"model.layers.\1.input_layernorm\2"},
    {"match": r"^layers\.(\d+)\.ffn_norm(\.weight)?$", "rename": r"model.layers.\1.post_attention_layernorm\2"},
    {"match": r"^layers\.(\d+)\.attention\.(q|k)$", "rename": r"model.layers.\1.self_attn.\2_rope"},
    {"match": r"^layers\.(\d+)\.attention\.(scores|probs|context)$", "rename": r"model.layers.\1.self_attn.\2"},
    {"match": r"^layers\.(\d+)\.attention\.wo(\.weight)?$", "rename": r"model.layers.\1.self_attn.o_proj\2"},
    {"match": r"^layers\.(\d+)\.feed_forward\.act$", "rename": r"model.layers.\1.mlp.swiglu"},
    {"match": r"^layers\.(\d+)\.feed_forward\.w2\.weight$", "transpose": True},
    {"match": r"^layers\.(\d+)\.feed_forward\.w2(\.weight)?$", "rename": r"model.layers.\1.mlp.down_proj\2"},
    {"match": r"^layers\.(\d+)\.feed_forward\.w13$", "axis": -1,
     "split": [r"model.layers.\1.mlp.gate_proj", r"model.layers.\1.mlp.up_proj"]},
    {"match": r"^layers\.(\d+)\.feed_forward\.w13\.weight$", "axis": 0,
     "split": [r"model.layers.\1.mlp.gate_proj.weight", r"model.layers.\1.mlp.up_proj.weight"]},
]


def qkv_rules(cfg):
    """The fused q/k/v split: its sizes depend on the config."""
    sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    names = [rf"model.layers.\1.self_attn.{p}_proj" for p in "qkv"]
    return [{"match": r"^layers\.(\d+)\.attention\.wqkv$", "split": names, "axis": -1, "sizes": sizes},
            {"match": r"^layers\.(\d+)\.attention\.wqkv\.weight$", "split": [n + ".weight" for n in names],
             "axis": 0, "sizes": sizes}]


def meta_rope_rules(cfg):
    """Meta's interleaved rotary order back to Hugging Face's halves: q/k weights' rows, the q/k
    projections' last axis, q_rope/k_rope's last axis."""
    hd = cfg.head_dim
    return [{"match": r"self_attn\.[qk]_proj\.weight$", "rope": "interleaved", "head_dim": hd, "axis": 0},
            {"match": r"self_attn\.[qk]_(proj|rope)$", "rope": "interleaved", "head_dim": hd, "axis": -1}]


def to_meta_rows(w, hd):
    """Hugging Face's q/k rows (head, half, i) -> Meta's (head, i, half)."""
    return w.reshape(-1, 2, hd // 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def own_params(params, cfg, meta_rope=False):
    """npllama's (Hugging Face) parameters in this implementation's layout."""
    hd = cfg.head_dim
    own = {"tok_embeddings.weight": params["model.embed_tokens.weight"], "norm.weight": params["model.norm.weight"],
           "output.weight": params.get("lm_head.weight", params["model.embed_tokens.weight"])}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        q, k = params[p + "self_attn.q_proj.weight"], params[p + "self_attn.k_proj.weight"]
        if meta_rope:
            q, k = to_meta_rows(q, hd), to_meta_rows(k, hd)
        own.update({
            f"layers.{i}.attention_norm.weight": params[p + "input_layernorm.weight"],
            f"layers.{i}.attention.wqkv.weight": np.concatenate([q, k, params[p + "self_attn.v_proj.weight"]]),
            f"layers.{i}.attention.wo.weight": params[p + "self_attn.o_proj.weight"],
            f"layers.{i}.ffn_norm.weight": params[p + "post_attention_layernorm.weight"],
            f"layers.{i}.feed_forward.w13.weight": np.concatenate([params[p + "mlp.gate_proj.weight"],
                                                                    params[p + "mlp.up_proj.weight"]]),
            f"layers.{i}.feed_forward.w2.weight": params[p + "mlp.down_proj.weight"].T.copy(),
        })
    return {k: np.array(v, dtype=np.float64) for k, v in own.items()}


# ---- the pieces, forward and backward ------------------------------------------------------------
def rms(x, w, eps, bug):
    ms = np.mean(x * x, axis=-1, keepdims=True)
    s = np.sqrt(ms)
    d = s + eps if bug else np.sqrt(ms + eps)
    return w * x / d, (x, w, s, d, bug)


def rms_back(dy, cache):
    x, w, s, d, bug = cache
    g = dy * w
    dd_scale = s if bug else d        # d(d)/dx_i = x_i / (D * dd_scale)
    dx = g / d - x * np.sum(g * x, axis=-1, keepdims=True) / (d * d * x.shape[-1] * dd_scale)
    dw = np.sum((dy * x / d).reshape(-1, x.shape[-1]), axis=0)
    return dx, dw


def pairs(x, interleaved):
    return (x[..., 0::2], x[..., 1::2]) if interleaved else np.split(x, 2, axis=-1)


def unpairs(a, b, interleaved):
    if interleaved:
        out = np.empty(a.shape[:-1] + (2 * a.shape[-1],))
        out[..., 0::2], out[..., 1::2] = a, b
        return out
    return np.concatenate([a, b], axis=-1)


def rotate(x, cos, sin, interleaved, sign=1.0):
    a, b = pairs(x, interleaved)
    return unpairs(a * cos - sign * b * sin, b * cos + sign * a * sin, interleaved)


def run(own, cfg, tokens, targets, bugs=(), meta_rope=False):
    """Every activation and gradient under this implementation's names."""
    unknown = set(bugs) - set(BUGS)
    assert not unknown, unknown
    B, T = tokens.shape
    H, K, hd, L, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers, cfg.norm_eps
    G = H // K
    interleaved = meta_rope or "rope_interleaved" in bugs
    scale = 1.0 / hd if "scale_1_over_hd" in bugs else 1.0 / np.sqrt(hd)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(np.arange(T)[:, None] * inv_freq), np.sin(np.arange(T)[:, None] * inv_freq)
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    heads = lambda x, n: x.reshape(B, T, n, hd).transpose(0, 2, 1, 3)          # noqa: E731
    merge = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, -1)                 # noqa: E731

    def expand(kv):   # (B, K, T, hd) -> (B, H, T, hd)
        return np.tile(kv, (1, G, 1, 1)) if "gqa_tile" in bugs else np.repeat(kv, G, axis=1)

    def reduce(dkv):  # (B, H, T, hd) -> (B, K, T, hd): the gradients of a head's copies summed
        if "gqa_tile" in bugs:
            return dkv.reshape(B, G, K, T, hd).sum(axis=1)
        return dkv.reshape(B, K, G, T, hd).sum(axis=2)

    act, grad, caches = {}, {}, []
    x = own["tok_embeddings.weight"][tokens]
    act["tok_embeddings"] = x
    for i in range(L):
        p = f"layers.{i}."
        act[p + "x"] = x
        n1, c1 = rms(x, own[p + "attention_norm.weight"], eps, "eps_outside_sqrt" in bugs)
        qkv = n1 @ own[p + "attention.wqkv.weight"].T
        q, k, v = np.split(qkv, [H * hd, (H + K) * hd], axis=-1)
        q, k, v = heads(q, H), heads(k, K), heads(v, K)
        q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
        kk, vv = expand(k), expand(v)
        scores = np.where(future, -np.inf, q @ kk.transpose(0, 1, 3, 2) * scale)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        context = merge(probs @ vv)
        a = context @ own[p + "attention.wo.weight"].T
        h = x + a
        n2, c2 = rms(h, own[p + "ffn_norm.weight"], eps, "eps_outside_sqrt" in bugs)
        gu = n2 @ own[p + "feed_forward.w13.weight"].T
        g, u = np.split(gu, 2, axis=-1)
        sig = 1 / (1 + np.exp(-g))
        s = g * sig * u
        f = s @ own[p + "feed_forward.w2.weight"]
        x = h + f
        act.update({p + "attention_norm": n1, p + "attention.wqkv": qkv, p + "attention.q": q, p + "attention.k": k,
                    p + "attention.scores": scores, p + "attention.probs": probs, p + "attention.context": context,
                    p + "attention.wo": a, p + "h": h, p + "ffn_norm": n2, p + "feed_forward.w13": gu,
                    p + "feed_forward.act": s, p + "feed_forward.w2": f, p + "out": x})
        caches.append((c1, c2, n1, q, kk, vv, probs, context, n2, g, u, sig, s))
    xn, cn = rms(x, own["norm.weight"], eps, "eps_outside_sqrt" in bugs)
    logits = xn @ own["output.weight"].T
    act.update({"norm": xn, "output": logits})
    # loss: mean cross-entropy over the targets that count
    V = logits.shape[-1]
    keep = targets != -100
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    count = max(int(keep.sum()), 1)
    loss = -np.sum(np.where(keep, np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0], 0))
    loss /= count
    # backward
    dlogits = np.exp(logp)
    dlogits[keep] -= np.eye(V)[targets[keep]]
    dlogits[~keep] = 0
    dlogits /= count
    grad["output"] = dlogits
    grad["output.weight"] = dlogits.reshape(-1, V).T @ xn.reshape(-1, xn.shape[-1])
    dxn = dlogits @ own["output.weight"]
    grad["norm"] = dxn
    dx, grad["norm.weight"] = rms_back(dxn, cn)
    for i in reversed(range(L)):
        p = f"layers.{i}."
        c1, c2, n1, q, kk, vv, probs, context, n2, g, u, sig, s = caches[i]
        grad[p + "out"] = dx
        df = dx
        grad[p + "feed_forward.w2"] = df
        grad[p + "feed_forward.w2.weight"] = s.reshape(-1, s.shape[-1]).T @ df.reshape(-1, df.shape[-1])
        ds = df @ own[p + "feed_forward.w2.weight"].T
        grad[p + "feed_forward.act"] = ds
        dsilu = sig if "swiglu_no_sigma_prime" in bugs else sig * (1 + g * (1 - sig))
        dgu = np.concatenate([ds * u * dsilu, ds * g * sig], axis=-1)
        grad[p + "feed_forward.w13"] = dgu
        grad[p + "feed_forward.w13.weight"] = dgu.reshape(-1, dgu.shape[-1]).T @ n2.reshape(-1, n2.shape[-1])
        dn2 = dgu @ own[p + "feed_forward.w13.weight"]
        grad[p + "ffn_norm"] = dn2
        dh_ffn, grad[p + "ffn_norm.weight"] = rms_back(dn2, c2)
        dh = dx + dh_ffn
        grad[p + "h"] = dh
        grad[p + "attention.wo"] = dh
        grad[p + "attention.wo.weight"] = dh.reshape(-1, dh.shape[-1]).T @ context.reshape(-1, context.shape[-1])
        dcontext = dh @ own[p + "attention.wo.weight"]
        grad[p + "attention.context"] = dcontext
        do = heads(dcontext, H)
        dprobs = do @ vv.transpose(0, 1, 3, 2)
        grad[p + "attention.probs"] = dprobs
        dvv = probs.transpose(0, 1, 3, 2) @ do
        dscores = probs * (dprobs - np.sum(probs * dprobs, -1, keepdims=True))
        grad[p + "attention.scores"] = dscores
        dq = dscores @ kk * scale
        dk = reduce(dscores.transpose(0, 1, 3, 2) @ q * scale)
        dv = reduce(dvv)
        grad[p + "attention.q"], grad[p + "attention.k"] = dq, dk
        dq, dk = rotate(dq, cos, sin, interleaved, -1.0), rotate(dk, cos, sin, interleaved, -1.0)
        dqkv = np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)
        grad[p + "attention.wqkv"] = dqkv
        grad[p + "attention.wqkv.weight"] = dqkv.reshape(-1, dqkv.shape[-1]).T @ n1.reshape(-1, n1.shape[-1])
        dn1 = dqkv @ own[p + "attention.wqkv.weight"]
        grad[p + "attention_norm"] = dn1
        dx_attn, grad[p + "attention_norm.weight"] = rms_back(dn1, c1)
        dx = dh + dx_attn
        grad[p + "x"] = dx
    grad["tok_embeddings"] = dx
    d_embed = np.zeros_like(own["tok_embeddings.weight"])
    np.add.at(d_embed, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    grad["tok_embeddings.weight"] = d_embed
    if cfg.tie_embeddings:
        grad["tok_embeddings.weight"] = d_embed + grad.pop("output.weight")
        own_names = set(own) - {"output.weight"}
    else:
        own_names = set(own)
    assert own_names <= set(grad)
    return {"tokens": tokens, "targets": targets, "loss": np.array(loss), **act,
            **{"grad." + k: v for k, v in grad.items()}}
