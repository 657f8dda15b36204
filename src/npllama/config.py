"""LlamaConfig: the shape of a model, and its translation to and from Hugging Face's config.json."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# the projections a LoRA adapter can sit on, as PEFT's target_modules names them
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

@dataclass
class LlamaConfig:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None      # None -> n_heads (plain multi-head attention)
    hidden_dim: int = 172              # SwiGLU inner width
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # None, or {"rope_type": "llama3", factor, low_freq_factor, ...}
    tie_embeddings: bool = False
    dropout: float = 0.0
    head_dim: int | None = None        # None -> dim // n_heads
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {short_repr(value)}")
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ConfigError(f"LlamaConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        elif isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"LlamaConfig.head_dim must be a positive integer, got {short_repr(self.head_dim)}")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"LlamaConfig: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"LlamaConfig: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if not (_is_number(self.norm_eps) and self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"LlamaConfig.norm_eps must be a positive number, got {short_repr(self.norm_eps)}")
        if not (_is_number(self.rope_theta) and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"LlamaConfig.rope_theta must be a positive number, got {short_repr(self.rope_theta)}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LlamaConfig.dropout must be in [0, 1), got {short_repr(self.dropout)}")
        if not (isinstance(self.tie_embeddings, bool) or self.tie_embeddings in (0, 1)):
            raise ConfigError(f"LlamaConfig.tie_embeddings must be true or false, got {short_repr(self.tie_embeddings)}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"LlamaConfig.{name} must be None or a non-negative integer, got {short_repr(value)}")
        self.norm_eps = float(self.norm_eps)
        self.rope_theta = float(self.rope_theta)
        self.dropout = float(self.dropout)
        self.tie_embeddings = bool(self.tie_embeddings)
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        d, h = self.dim, self.hidden_dim
        per_layer = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d + 3 * d * h + 2 * d
        n = self.vocab_size * d + self.n_layers * per_layer + d
        if not self.tie_embeddings:
            n += self.vocab_size * d
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"LlamaConfig: expected an object of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise ConfigError(f"LlamaConfig: unknown field(s) {unknown}")
        return cls(**d)

    # ---- Hugging Face config.json ---------------------------------------------------------
    def to_hf_dict(self) -> dict:
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {"rope_theta": self.rope_theta, **self.rope_scaling}
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            # Both spellings: rope_theta/rope_scaling (transformers 4) and rope_parameters (5).
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": self.dropout,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
        }
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """Read a Hugging Face Llama config; refuse anything npllama would compute differently."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {short_repr(model_type)} is not supported (only 'llama')")
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if not isinstance(archs, list) or any(a not in ("LlamaForCausalLM", "LlamaModel") for a in archs):
            raise ConfigError(f"{source}: architectures {short_repr(archs)} is not supported (only LlamaForCausalLM)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                raise ConfigError(f"{source}: {key}=true is not supported (npllama's Llama has no biases)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {short_repr(act)} is not supported (only 'silu')")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={short_repr(hf['pretraining_tp'])} is not supported (only 1)")

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")

        # Check types before any arithmetic on them: "x" * 10**10 is a 10 GB string.
        for key in required + ("num_key_value_heads", "max_position_embeddings", "head_dim"):
            value = hf.get(key)
            if value is None and key not in required:   # optional: null means the default
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {short_repr(value)}")
        tie = hf.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {short_repr(tie)}")
        rope_theta, rope_scaling = _hf_rope(hf, source)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kwargs: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"],
            max_seq_len=_or_default(hf.get("max_position_embeddings"), 2048),
            norm_eps=_or_default(hf.get("rms_norm_eps"), 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_embeddings=tie,
            head_dim=hf.get("head_dim"),
            bos_token_id=_token_id_or_none(hf.get("bos_token_id")),
            eos_token_id=_token_id_or_none(eos),
        )
        if kwargs["head_dim"] is not None and kwargs["head_dim"] * kwargs["n_heads"] == kwargs["dim"]:
            kwargs["head_dim"] = None
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {e}") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def short_repr(value, limit=80) -> str:
    """repr of a config value, cut short: the value may be a megabyte of junk, or an integer too
    long for repr (Python refuses to print more than 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        text = "a huge integer"
    return text if len(text) <= limit else text[:limit] + "..."


def _or_default(value, default):
    return default if value is None else value


def _token_id_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _check_rope_scaling(rs):
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"LlamaConfig.rope_scaling must be None or a dict, got {type(rs).__name__}")
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default") and not (set(rs) - {"rope_type", "type", "rope_theta"}):
        return None
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling: rope_type {short_repr(rope_type)} is not supported (only 'llama3' or default)")
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in rs]
    if missing:
        raise ConfigError(f"rope_scaling: llama3 scaling needs {missing}")
    out = {"rope_type": "llama3"}
    for k in LLAMA3_SCALING_KEYS:
        v = rs[k]
        if not _is_number(v) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"rope_scaling.{k} must be a positive number, got {short_repr(v)}")
        if k == "original_max_position_embeddings" and v != int(v):
            raise ConfigError(f"rope_scaling.{k} must be an integer, got {short_repr(v)}")
        out[k] = float(v) if k != "original_max_position_embeddings" else int(v)
    if out["high_freq_factor"] == out["low_freq_factor"]:
        raise ConfigError("rope_scaling: high_freq_factor must differ from low_freq_factor")
    return out


def _hf_rope(hf: dict, source: str):
    """Return (rope_theta, rope_scaling) from either spelling of the RoPE settings."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            scaling = params
        elif scaling is None:
            scaling = None
    elif params is not None:
        raise ConfigError(f"{source}: rope_parameters must be an object")
    if theta is None:
        theta = 10000.0
    try:
        return theta, _check_rope_scaling(scaling)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
