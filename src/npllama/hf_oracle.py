"""Hugging Face transformers as an oracle: its Llama in float64 throughout, its activations and
gradients recorded by hooks under npllama's names, into npllama's golden file format.

Needs torch and transformers, which npllama does not (`pip install torch`, then the ``[torch]``
extra); they are imported when a function here is called, not when this module is.

A ``LlamaForCausalLM`` converted to float64 is *not* float64 throughout (transformers 5.x):

* ``LlamaRMSNorm.forward`` casts the activations to float32 before normalising;
* ``LlamaRotaryEmbedding`` builds ``inv_freq`` with ``dtype=torch.float`` (also for llama3 scaling) and
  its forward computes ``position * inv_freq`` and cos/sin in float32, casting to float64 afterwards;
* ``eager_attention_forward`` runs the softmax with ``dtype=torch.float32``;
* the built-in causal-LM loss does ``logits.float()`` (and shifts the labels by one).

Each of these loses ~1e-7 relative.  ``float64_llama()`` swaps in float64 versions of the first three
for the duration of a ``with`` block; ``causal_lm_loss`` replaces the fourth (and takes targets
already shifted, as npllama does).  Models must use ``attn_implementation="eager"`` so that the
patched attention is the one used (``load_float64`` loads them so).

The float64 RoPE tables follow the transformers formulas exactly:

    inv_freq_i = 1 / theta^(2i / head_dim),  i = 0 .. head_dim/2 - 1
    llama3:  wavelen = 2 pi / inv_freq
             wavelen < L/high_freq_factor  -> inv_freq            (high frequencies kept)
             wavelen > L/low_freq_factor   -> inv_freq / factor   (low frequencies slowed down)
             otherwise, s = (L / wavelen - low) / (high - low):
                          (1 - s) inv_freq / factor + s inv_freq
             with L = original_max_position_embeddings
    cos/sin(position * inv_freq), duplicated over the two halves of the head (rotate_half layout).

Recording.  ``Recorder`` keeps tensors by name and, after ``backward()``, their gradients:
``recorder.capture(name, tensor)`` inside a forward, or ``hook_output(module, name)`` /
``hook_input(module, name)`` on modules, which is all a PyTorch implementation of your own needs
(docs/check-your-implementation.md).  ``record_transformers`` does it for a transformers Llama: a
hook per module whose output is a named activation, the block inputs and the o_proj / down_proj
/ post_attention_layernorm inputs, and q_rope, k_rope, scores, probs inside the patched attention.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .golden import golden_tensors
from .reference import Run, causal_visibility

_ACTIVE = {"recorder": None}   # the recorder the patched attention reports to, during record_transformers


def _torch():
    try:
        import torch   # optional dependency: only when an oracle function is called
        from transformers.models.llama import modeling_llama
    except ImportError as e:
        raise ImportError(f"npllama.hf_oracle needs torch and transformers ({e}): pip install torch, then "
                          "pip install 'npllama[torch]'") from None
    return torch, modeling_llama


def rope_inv_freq_float64(config):
    """RoPE inverse frequencies (head_dim/2,) in float64, for rope_type 'default' or 'llama3'."""
    torch, _ = _torch()
    params = config.rope_parameters
    theta = float(params["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise NotImplementedError(f"float64 RoPE for rope_type {rope_type!r} is not implemented")
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _rmsnorm_forward(self, hidden_states):
    # Same as LlamaRMSNorm.forward without the float32 round trip: w * x / sqrt(mean(x^2) + eps).
    torch, _ = _torch()
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_forward(self, x, position_ids):
    # inv_freq recomputed in float64 from the config (the buffer holds float32-rounded values).
    torch, _ = _torch()
    inv_freq = rope_inv_freq_float64(self.config).to(x.device)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * self.attention_scaling
    sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # Same as modeling_llama.eager_attention_forward with the softmax in the query's dtype; while
    # record_transformers runs, q_rope, k_rope, scores (-inf where masked) and probs are captured.
    torch, modeling_llama = _torch()
    recorder = _ACTIVE["recorder"]
    name = f"model.layers.{module.layer_idx}.self_attn."
    if recorder is not None:
        query, key = recorder.capture(name + "q_rope", query), recorder.capture(name + "k_rope", key)
    key_states = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value_states = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    if recorder is not None:
        shown = attn_weights.detach()
        if attention_mask is not None:   # transformers masks by adding finfo.min: record those as -inf
            shown = shown.masked_fill(attention_mask != 0, -math.inf)
        attn_weights = recorder.capture(name + "scores", attn_weights, value=shown)
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=query.dtype)
    if recorder is not None:
        attn_weights = recorder.capture(name + "probs", attn_weights)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


@contextlib.contextmanager
def float64_llama():
    """Within the block, transformers' Llama keeps float64 activations float64 everywhere."""
    _, modeling_llama = _torch()
    saved = (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward,
             modeling_llama.eager_attention_forward)
    modeling_llama.LlamaRMSNorm.forward = _rmsnorm_forward
    modeling_llama.LlamaRotaryEmbedding.forward = _rotary_forward
    modeling_llama.eager_attention_forward = _eager_attention_forward
    try:
        yield
    finally:
        (modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward,
         modeling_llama.eager_attention_forward) = saved


def causal_lm_loss(logits, targets, reduction="mean"):
    """Cross-entropy over positions with targets != -100, in the logits' dtype: the mean (or sum).

    ``targets[b, t]`` is the target of ``logits[b, t]`` (no shift, unlike transformers' built-in loss):
        L = -(1/N) sum_{(b,t): y_bt != -100} log softmax(logits_bt)[y_bt]
    """
    torch, _ = _torch()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def load_float64(path):
    """A transformers ``LlamaForCausalLM`` from ``path`` in float64 with eager attention (for
    ``float64_llama`` and ``record_transformers``)."""
    torch, _ = _torch()
    import transformers   # optional dependency, as in _torch
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    return model.eval()


# ---- recording ---------------------------------------------------------------------------------------
class Recorder:
    """Named tensors of a PyTorch forward, and after ``backward()`` their gradients.

        rec = Recorder()
        rec.hook_output(model.layers[0].attn.wq, "model.layers.0.self_attn.q_proj")   # a module's output
        rec.hook_input(model.layers[0].attn.wo, "model.layers.0.self_attn.context")   # a module's input
        ... inside your forward:  scores = rec.capture("model.layers.0.self_attn.scores", scores)
        loss.backward()
        tensors = rec.tensors()     # {name: array, "grad." + name: array}, float64 NumPy
        rec.remove()                # the hooks
    """

    def __init__(self):
        self.captured, self.values, self.handles = {}, {}, []

    def capture(self, name, tensor, value=None):
        """Keep ``tensor`` under ``name`` (and its gradient after backward); ``value``: what to
        record as its value instead (e.g. with -inf where masked).  Returns the tensor."""
        if tensor.requires_grad:
            tensor.retain_grad()
        self.captured[name] = tensor
        self.values[name] = tensor.detach() if value is None else value
        return tensor

    def hook_output(self, module, name):
        def hook(_module, _args, out):
            self.capture(name, out if not isinstance(out, tuple) else out[0])
        self.handles.append(module.register_forward_hook(hook))

    def hook_input(self, module, name):
        def hook(_module, args):
            self.capture(name, args[0])
        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def tensors(self) -> dict:
        out = {name: _numpy(v) for name, v in self.values.items()}
        for name, t in self.captured.items():
            if t.grad is not None:
                out["grad." + name] = _numpy(t.grad)
        return out


def _numpy(t):
    return t.detach().cpu().numpy().astype(np.float64) if t.is_floating_point() else t.detach().cpu().numpy()


def hook_llama(recorder, model):
    """Hooks on a transformers Llama for every named activation that is a module's output or input."""
    base = model.model
    recorder.hook_output(base.embed_tokens, "model.embed_tokens")
    for i, layer in enumerate(base.layers):
        p = f"model.layers.{i}."
        recorder.hook_input(layer, p + "resid_pre")
        recorder.hook_output(layer, p + "resid_post")
        recorder.hook_input(layer.post_attention_layernorm, p + "resid_mid")
        recorder.hook_input(layer.self_attn.o_proj, p + "self_attn.context")
        recorder.hook_input(layer.mlp.down_proj, p + "mlp.swiglu")
        for sub in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                    "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            recorder.hook_output(layer.get_submodule(sub), p + sub)
    recorder.hook_output(base.norm, "model.norm")
    recorder.hook_output(model.lm_head, "lm_head")


def additive_mask(T, segment_ids=None, attention_mask=None):
    """npllama's visibility (``reference.causal_visibility``) as the 4-D float mask transformers takes:
    (B, 1, T, T), 0 where visible, -inf elsewhere."""
    torch, _ = _torch()
    visible = np.broadcast_to(causal_visibility(T, segment_ids, attention_mask),
                              (len(segment_ids if segment_ids is not None else attention_mask), 1, T, T))
    return torch.from_numpy(np.where(visible, 0.0, -np.inf))


def record_transformers(model, tokens=None, targets=None, *, inputs_embeds=None, position_ids=None,
                        segment_ids=None, attention_mask=None, reduction="mean", dlogits=None) -> dict:
    """Run a transformers ``LlamaForCausalLM`` (float64, eager attention: ``load_float64``) in
    float64 throughout and return what ``npllama reference`` writes, under the same names: tokens,
    targets, loss, every named activation, "grad." of each and of every parameter.  The arguments
    are ``npllama.reference.run_with_cache``'s (targets already shifted; segment_ids and
    attention_mask become npllama's 4-D mask)."""
    torch, _ = _torch()
    as_tensor = lambda a: None if a is None else torch.as_tensor(np.asarray(a))   # noqa: E731
    recorder = Recorder()
    hook_llama(recorder, model)
    model.zero_grad(set_to_none=True)
    _ACTIVE["recorder"] = recorder
    try:
        with float64_llama():
            embeds = None
            if inputs_embeds is not None:
                embeds = recorder.capture("inputs_embeds", torch.tensor(np.asarray(inputs_embeds, dtype=np.float64),
                                                                        requires_grad=True))
            T = (np.shape(tokens) if tokens is not None else np.shape(inputs_embeds))[1]
            mask = None if segment_ids is None and attention_mask is None else additive_mask(T, segment_ids,
                                                                                              attention_mask)
            positions = as_tensor(position_ids)
            if positions is not None and positions.ndim == 1:
                positions = positions[None]
            logits = model(input_ids=as_tensor(tokens), inputs_embeds=embeds, attention_mask=mask,
                           position_ids=positions, use_cache=False).logits
            loss = None
            if targets is not None:
                loss = causal_lm_loss(logits, as_tensor(targets), reduction)
                loss.backward()
            elif dlogits is not None:
                (logits * as_tensor(dlogits)).sum().backward()
    finally:
        _ACTIVE["recorder"] = None
        recorder.remove()
    tensors = recorder.tensors()
    activations = {k: v for k, v in tensors.items() if not k.startswith("grad.")}
    grads = {k: v for k, v in tensors.items() if k.startswith("grad.")}
    if targets is not None or dlogits is not None:
        # a parameter the loss does not reach (the embedding, given inputs_embeds) has gradient 0
        grads.update({"grad." + n: _numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape))
                      for n, p in model.named_parameters()})
    run = Run(activations["lm_head"], None if loss is None else loss.item(), activations, grads)
    return golden_tensors(run, tokens, targets)
