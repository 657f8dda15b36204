"""GGUF in: small Llamas written with llama.cpp's own writer (the gguf package) the way llama.cpp's
converter writes them (Q/K rows permuted by convert_hf_to_gguf.py's LlamaModel.permute), read back.

The real-model checks against transformers are in tests/test_smollm2.py.
"""
import contextlib
import json
import resource
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from npllama import CheckpointError, ConfigError, InputError, Llama, LlamaConfig, Tokenizer
from npllama.chat_template import render_chat
from npllama.formats.gguf import GGUFCheckpoint, hf_name, load_weights, open_gguf
from npllama.gradcheck import relative_error
from npllama.formats.gguf_tokenizer import sentencepiece_merges

CFG = LlamaConfig(vocab_size=64, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=32,
                  norm_eps=1e-5, rope_theta=5e5)
GGUF_NAMES = {hf_name(g): g for g in
              ["token_embd.weight", "output_norm.weight", "output.weight"]
              + [f"blk.{i}.{t}.weight" for i in range(CFG.n_layers) for t in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]}
K_QUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of a block's float16 scales


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rows -> llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_model(cfg, seed=0):
    model = Llama(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        p[...] = rng.normal(0, 0.5, p.shape) if p.ndim == 2 else 1 + rng.normal(0, 0.1, p.shape)
    return model


def k_quant_blocks(rows, cols, qtype, rng):
    """Random blocks of a K-quant type (the gguf package cannot quantize to these), sane scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        raw[..., offset:offset + 2] = rng.uniform(0.001, 0.01, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@contextlib.contextmanager
def bounded_address_space(extra_bytes):
    """At most ``extra_bytes`` more address space for this process meanwhile: a loader that trusts a
    size field gets MemoryError (failing the test) instead of the machine's memory."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes if hard == resource.RLIM_INFINITY
                                            else min(vm + extra_bytes, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def write_gguf(path, params, cfg, qtype=Q.F32, arch="llama", skip=(), extra=None, tokenizer=None, seed=0, qtypes=None):
    """A .gguf of ``params`` (HF names) as llama.cpp's converter writes it; matrices stored as ``qtype``
    (K-quants: random blocks instead), or as ``qtypes`` says by HF name.  Returns {HF name: the float32
    values the file holds, in GGUF row order}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", cfg.n_layers), ("context_length", cfg.max_seq_len),
                       ("embedding_length", cfg.dim), ("feed_forward_length", cfg.hidden_dim),
                       ("attention.head_count", cfg.n_heads), ("attention.head_count_kv", cfg.n_kv_heads)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    for key, value in (tokenizer or {}).items():
        getattr(w, key)(value)
    stored, default_qtype = {}, qtype
    for name, p in params.items():
        if name in skip:
            continue
        x = np.asarray(p, dtype=np.float32)
        qtype = (qtypes or {}).get(name, default_qtype)
        if name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, cfg.n_kv_heads)
        if x.ndim == 1 or qtype == Q.F32:
            data, raw = np.ascontiguousarray(x), None
        elif qtype == Q.F16:
            data, raw = x.astype(np.float16), None
        else:
            data = k_quant_blocks(*x.shape, qtype, rng) if qtype in K_QUANT_SCALES else gguf.quants.quantize(x, qtype)
            raw = qtype
        stored[name] = gguf.quants.dequantize(data, raw) if raw else data.astype(np.float32)
        w.add_tensor(GGUF_NAMES[name], data, raw_dtype=raw)
    for gguf_name, data in (extra or {}).items():
        w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def load(path, dtype=np.float64):
    ckpt = open_gguf(path)
    model = Llama(ckpt.config, dtype=dtype)
    load_weights(ckpt, model.params)
    return model


def test_f32_gguf_loads_the_exact_weights_and_config(tmp_path):
    src = random_model(CFG)
    write_gguf(tmp_path / "m.gguf", src.params, CFG)
    model = load(tmp_path / "m.gguf", np.float32)
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.max_seq_len,
            cfg.rope_theta, cfg.tie_embeddings, cfg.head_dim) == (64, 256, 2, 4, 2, 256, 32, 5e5, False, 64)
    assert cfg.norm_eps == float(np.float32(1e-5))   # the file's float32, as llama.cpp and transformers use it
    for name, p in src.params.items():
        np.testing.assert_array_equal(model.params[name], p.astype(np.float32), err_msg=name)
    tokens = np.array([[1, 5, 9, 63, 0, 7]])
    src32 = Llama(cfg, dtype=np.float32)
    src32.flat_params[...] = src.flat_params
    np.testing.assert_array_equal(model.eval().forward(tokens), src32.eval().forward(tokens))


def test_no_output_tensor_means_tied_embeddings(tmp_path):
    tied = LlamaConfig(**{**CFG.to_dict(), "tie_embeddings": True})
    src = random_model(tied)
    write_gguf(tmp_path / "m.gguf", src.params, tied)
    model = load(tmp_path / "m.gguf")
    assert model.config.tie_embeddings and "lm_head.weight" not in model.params
    np.testing.assert_array_equal(model.lm_head, src.params["model.embed_tokens.weight"].astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_quantized_gguf_loads_llama_cpps_dequantized_values_rows_unpermuted(tmp_path, qtype, monkeypatch):
    # Chunks of one head (64 rows here), so that unpermuting chunk by chunk is exercised too.
    monkeypatch.setattr("npllama.formats.gguf.CHUNK_ELEMENTS", 64 * CFG.dim)
    src = random_model(CFG)
    stored = write_gguf(tmp_path / "m.gguf", src.params, CFG, qtype)
    model = load(tmp_path / "m.gguf")
    for name, values in stored.items():
        got = model.params[name]
        if name.endswith("q_proj.weight"):
            got = llama_cpp_permute(got, CFG.n_heads)   # back to the file's row order
        elif name.endswith("k_proj.weight"):
            got = llama_cpp_permute(got, CFG.n_kv_heads)
        np.testing.assert_array_equal(got, values.astype(np.float64), err_msg=name)
    if qtype not in K_QUANT_SCALES:   # quantized from src: close to it (the Q/K rows in their HF places)
        tol = {Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2, Q.Q4_0: 0.6, Q.Q4_1: 0.5, Q.Q5_0: 0.3, Q.Q5_1: 0.25}[qtype]
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
            np.testing.assert_allclose(model.params[name], src.params[name], atol=tol, err_msg=name)


def test_gguf_in_a_directory_and_tokenizer_with_chat_template(tmp_path):
    trained = Tokenizer.train(["hello world, hello there " * 20, "<|im_start|> <|im_end|>"], vocab_size=270,
                              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    spec = json.loads(trained.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    cfg = LlamaConfig(**{**CFG.to_dict(), "vocab_size": 320})
    meta = {"add_tokenizer_model": "gpt2", "add_token_list": tokens, "add_token_merges": merges,
            "add_token_types": [3 if t.startswith("<|") else 1 for t in tokens],
            "add_eos_token_id": tokens.index("<|im_end|>"), "add_bos_token_id": tokens.index("<|endoftext|>"),
            "add_chat_template": template}
    write_gguf(tmp_path / "model.gguf", random_model(cfg).params, cfg, tokenizer=meta)

    tok = Tokenizer.from_pretrained(tmp_path)   # the directory holding the one .gguf
    text = "hello there, world!\n\n  héllo 🌍 <|im_end|> wörld"
    np.testing.assert_array_equal(tok.encode(text), trained.encode(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == trained.token_to_id("<|im_end|>") and tok.stop_ids == (tok.eos_id,)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == trained.token_to_id("<|im_start|>")   # matched whole, as a special token
    assert open_gguf(tmp_path).config.eos_token_id == tok.eos_id
    with pytest.raises(CheckpointError) as e:   # the template's faults name the file it came from
        tok.apply_chat_template([{"role": "user", "content": 5}])
    assert str(e.value).startswith(f"{tmp_path / 'model.gguf'}: the chat template failed (TypeError: ")


def test_sentencepiece_vocabulary_merges_rank_by_score():
    vocab = {t: i for i, t in enumerate(["<unk>", "a", "b", "c", "ab", "bc", "abc"])}
    # abc splits two ways at one score: the longer left piece first, as transformers orders them
    scores = {"<unk>": 0.0, "a": -1.0, "b": -1.0, "c": -1.0, "ab": -3.0, "bc": -2.0, "abc": -2.5}
    assert sentencepiece_merges(vocab, scores) == [("b", "c"), ("ab", "c"), ("a", "bc"), ("a", "b")]


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    # A tiny Llama-2-style vocabulary: specials, byte fallback tokens, pieces with scores.
    pieces = ["\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "bc", "\u2581abc", "ca", "\u2581c"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    cfg = LlamaConfig(**{**CFG.to_dict(), "vocab_size": len(tokens)})
    meta = {"add_tokenizer_model": "llama", "add_token_list": tokens, "add_token_types": types,
            "add_token_scores": scores, "add_bos_token_id": 1, "add_eos_token_id": 2, "add_unk_token_id": 0}
    write_gguf(tmp_path / "sp.gguf", random_model(cfg).params, cfg, tokenizer=meta)
    tok = Tokenizer.from_pretrained(tmp_path / "sp.gguf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    text = "abc ab cab  bca é\nab</s>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.id_to_token(int(ids[0])) == "\u2581abc" and tok.token_to_id("</s>") in ids.tolist()
    # a corpus is encoded in chunks to the same ids (was: whole, one word of BPE)
    long_text = "".join(np.random.default_rng(0).choice(["abc", " ab", "  ", "ca", "\n", "é", "</s>", " c"], 3000))
    assert tok._chunking().kind == "pairs" and len(tok._chunking().split(long_text, 50)) > 100
    np.testing.assert_array_equal(tok.encode_long(long_text, chunk_chars=50), tok.encode(long_text))
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    theirs, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(tmp_path / "sp.gguf"))[:2])
    assert ids.tolist() == theirs.encode(text, add_special_tokens=False).ids, transformers.__version__


def test_bad_gguf_files_are_checkpoint_errors_naming_the_file(tmp_path):
    src = random_model(CFG)
    cases = {
        "garbage.gguf": None,
        "falcon.gguf": dict(arch="falcon"),
        "missing.gguf": dict(skip=("model.layers.1.mlp.up_proj.weight",)),
        "extra.gguf": dict(extra={"blk.0.attn_q.bias": np.zeros(256, np.float32)}),
        "ropefreqs.gguf": dict(extra={"rope_freqs.weight": np.ones(32, np.float32)}),
        "tq2_0.gguf": dict(qtype=Q.TQ2_0),   # (a ternary type npllama does not read)
    }
    expected = {"garbage.gguf": "not a readable GGUF", "falcon.gguf": "architecture 'falcon'",
                "missing.gguf": "missing tensor", "extra.gguf": "unexpected tensor 'blk.0.attn_q.bias'",
                "ropefreqs.gguf": "rope_freqs", "tq2_0.gguf": "TQ2_0"}
    for name, kwargs in cases.items():
        path = tmp_path / name
        if kwargs is None:
            path.write_bytes(b"GGUF" + bytes(range(200)))
        else:
            write_gguf(path, src.params, CFG, **kwargs)
        with pytest.raises(CheckpointError, match=expected[name]) as e:
            load(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .gguf file"):
        open_gguf(tmp_path / "empty")
    wrong_shape = LlamaConfig(**{**CFG.to_dict(), "hidden_dim": 512})
    write_gguf(tmp_path / "shape.gguf", random_model(CFG).params, wrong_shape)
    ckpt = GGUFCheckpoint(tmp_path / "shape.gguf")
    with pytest.raises(CheckpointError, match="has shape"):
        load_weights(ckpt, Llama(ckpt.config).params)


def test_chat_template_is_sandboxed_and_its_exceptions_are_input_errors():
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert render_chat(strict, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InputError, match="first must be user"):
        render_chat(strict, [{"role": "assistant", "content": "x"}])
    with pytest.raises(InputError, match="refused"):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        render_chat("{% for %}", [])
    assert render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "<é>"}]) == \
        '{"role": "user", "content": "<é>"}'
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer.train(["abc abc"], vocab_size=259).apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_directory_tokenizer_reads_its_chat_template(tmp_path):
    tok = Tokenizer.train(["hi there " * 10], vocab_size=265, special_tokens=["<|endoftext|>", "<|im_end|>"])
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": "{{ messages[0]['content'] }}{{ eos_token }}"}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.decode(loaded.apply_chat_template([{"role": "user", "content": "hi"}])) == "hi<|im_end|>"
    assert loaded.stop_ids == (loaded.token_to_id("<|im_end|>"),)


# ---- corrupt headers and weights (issue 28) ------------------------------------------------------
def _tensor_info_positions(path):
    """{GGUF tensor name: (byte position of its type field, of its offset field)} in the header."""
    reader = gguf.GGUFReader(str(path))
    positions = {}
    for t in reader.tensors:
        parts = t.field.parts
        type_at = t.field.offset + sum(p.nbytes for p in parts[:-2])
        positions[t.name] = (type_at, type_at + parts[-2].nbytes)
    return positions


def _patched(path, at, fmt, value):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, at, value)
    path.write_bytes(bytes(raw))
    return path


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_header_whose_tensors_do_not_tile_the_file_is_refused(tmp_path):
    src = random_model(CFG)
    write_gguf(tmp_path / "m.gguf", src.params, CFG)
    load(tmp_path / "m.gguf")   # (the file as written loads)
    positions = _tensor_info_positions(tmp_path / "m.gguf")
    n_tensors = len(positions)
    # a tensor count one short: every tensor read 64 bytes early and output.weight dropped (was: loaded, tied)
    short = tmp_path / "short.gguf"
    short.write_bytes((tmp_path / "m.gguf").read_bytes())
    _refused(_patched(short, 8, "<Q", n_tensors - 1), "belong to no tensor")
    # one tensor's offset moved onto another's
    overlap = tmp_path / "overlap.gguf"
    overlap.write_bytes((tmp_path / "m.gguf").read_bytes())
    reader = gguf.GGUFReader(str(overlap))
    first, second = sorted(reader.tensors, key=lambda t: t.data_offset)[:2]
    _patched(overlap, positions[second.name][1], "<Q", first.data_offset - reader.data_offset)
    _refused(overlap, "overlaps tensor")
    # an F32 matrix retyped as Q8_0 (was: loaded, a NaN warning only)
    retyped = tmp_path / "retyped.gguf"
    retyped.write_bytes((tmp_path / "m.gguf").read_bytes())
    _refused(_patched(retyped, positions["blk.0.attn_q.weight"][0], "<I", int(Q.Q8_0)), "belong to no tensor")
    # a truncated file
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "m.gguf").read_bytes()[:-100])
    _refused(cut, "GGUF")


# ---- the metadata's arrays, kept in the file until asked for (issue 30: load memory) ---------------
def _metadata_file(path):
    """A .gguf holding every kind of metadata array: strings (an empty one, long, multi-byte, a space), numbers
    of several widths, booleans, an array of arrays, and scalars around them."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_array("tokenizer.ggml.tokens", ["a", "b c", "\u0120\u00c3\u00a9", "<|im_end|>", "", "x" * 300, "\u00e9\u6f22"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 1, 3, 1, 1, 6])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0, 1e-3, 2.0, -7.5])
    w.add_key_value("test.int64s", [-(2 ** 40), 0, 2 ** 40], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64)
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_float32("llama.rope.freq_base", 5e5)
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_arrays_read_back_as_gguf_s_own_reader_reads_them(tmp_path):
    """npllama's reader keeps an array as the positions of its items and decodes them when asked:
    every field reads as the gguf package's reader reads it (contents whole, one item, a slice;
    types; data indices; parts), and the tensors after them are found at the same offsets."""
    from npllama.formats.gguf import _Reader
    path = _metadata_file(tmp_path / "m.gguf")
    ours, theirs = _Reader(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(theirs.fields)
    for key, expected in theirs.fields.items():
        field = ours.fields[key]
        assert field.types == expected.types and list(field.data) == list(expected.data), key
        assert field.contents() == expected.contents(), key
        assert len(field.parts) == len(expected.parts), key
        for i in range(len(expected.parts)):
            assert field.parts[i].dtype == expected.parts[i].dtype, (key, i)
            assert np.array_equal(field.parts[i], expected.parts[i]), (key, i)
        if expected.types[0] == gguf.GGUFValueType.ARRAY and len(expected.data) > 2:
            assert field.contents(1) == expected.contents(1), key
            assert field.contents(slice(1, None, 2)) == expected.contents(slice(1, None, 2)), key
    assert ours.fields["tokenizer.ggml.tokens"].contents()[5] == "x" * 300
    assert type(ours.fields["test.bools"].contents()[0]) is bool
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.data_offset) for t in ours.tensors] == [(t.name, t.data_offset) for t in theirs.tensors]


def test_a_metadata_string_array_running_past_the_file_is_refused_unread(tmp_path):
    """A count or a string length too large for the file is refused at once (not walked item by item
    through 2^60 strings), as one error naming the file."""
    src = random_model(CFG)
    write_gguf(tmp_path / "m.gguf", src.params, CFG, tokenizer={"add_token_list": [f"t{i}" for i in range(64)]})
    raw = (tmp_path / "m.gguf").read_bytes()
    count_at = raw.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8   # (its type, its items' type)
    assert struct.unpack_from("<Q", raw, count_at)[0] == 64
    for at, value, what in ((count_at, 2 ** 60, "count"), (count_at, 65, "count"), (count_at + 8, 2 ** 40, "length")):
        path = tmp_path / f"{what}-{value}.gguf"
        path.write_bytes(raw)
        with bounded_address_space(256 << 20):
            _refused(_patched(path, at, "<Q", value), "not a readable GGUF file")


def test_nan_or_infinite_weights_are_refused(tmp_path):
    for bad in (np.nan, np.inf):
        for qtype in (Q.F32, Q.F16):
            src = random_model(CFG)
            src.params["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
            path = tmp_path / f"{bad}-{qtype.name}.gguf"
            write_gguf(path, src.params, CFG, qtype=qtype)
            _refused(path, "tensor 'blk.1.ffn_down.weight': contains NaN or infinite values")


def test_a_block_count_the_tensors_cannot_hold_is_refused_before_allocating(tmp_path):
    src = random_model(CFG)
    for n_layers in (10**6, 2**31 - 1):
        path = tmp_path / f"{n_layers}.gguf"
        write_gguf(path, src.params, LlamaConfig(**{**CFG.to_dict(), "n_layers": n_layers}))
        with bounded_address_space(256 << 20):
            _refused(path, f"the metadata implies .* parameters \\({n_layers} layers")


def test_a_sentencepiece_vocabulary_of_long_tokens_is_refused_before_its_merges_blow_up(tmp_path):
    """'\u2581' * k for k = 1..1000 (1.7 MB): was 2.95 GB building its merges."""
    pieces = ["\u2581" * k for k in range(1, 1001)]
    tokens = ["<unk>", "<s>", "</s>"] + pieces
    cfg = LlamaConfig(**{**CFG.to_dict(), "vocab_size": len(tokens), "dim": 64, "hidden_dim": 64})
    meta = {"add_tokenizer_model": "llama", "add_token_list": tokens, "add_token_types": [2, 3, 3] + [1] * len(pieces),
            "add_token_scores": [0.0] * len(tokens), "add_bos_token_id": 1, "add_eos_token_id": 2}
    path = tmp_path / "long.gguf"
    write_gguf(path, random_model(cfg).params, cfg, tokenizer=meta)
    with bounded_address_space(384 << 20):
        with pytest.raises(CheckpointError, match="merges a token") as e:
            Tokenizer.from_pretrained(path)
    assert str(path) in str(e.value)
    # each bound alone: the work of trying every split, the number of merges
    long = {"\u2581" * k: k for k in range(1, 2001, 40)}
    with pytest.raises(ValueError, match="too long to build its merges from"):
        sentencepiece_merges(long, {t: 0.0 for t in long})
    many = {"a" * k: k for k in range(1, 201)}
    with pytest.raises(ValueError, match="more than 16 merges a token"):
        sentencepiece_merges(many, {t: 0.0 for t in many})
    assert len(sentencepiece_merges(dict(list(many.items())[:40]), {t: 0.0 for t in list(many)[:40]})) == 39 * 40 // 2


@pytest.mark.parametrize("tokens, merges, match", [
    (["a", "b", "ab", "<|endoftext|>"], ["a q"], r"does not make a tokenizer \(.*`q` out of vocabulary"),
    (["a", "b", "ab", "c", "ab"], ["a b"], r"token 'ab' is in the vocabulary twice \(ids 2 and 4\)"),
    ([1, 2, 3], ["a b"], "tokenizer.ggml.tokens must be a list of strings"),
])
def test_bad_gguf_tokenizer_metadata_is_one_error_naming_the_file(tmp_path, tokens, merges, match):
    """(were: a bare Exception of tokenizers, a silent second id, a TypeError)"""
    path = tmp_path / "tok.gguf"
    write_gguf(path, random_model(CFG).params, CFG,
               tokenizer={"add_tokenizer_model": "gpt2", "add_token_list": tokens, "add_token_merges": merges})
    with pytest.raises(CheckpointError, match=match) as e:
        Tokenizer.from_pretrained(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_a_gguf_without_block_count_names_the_file_once(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(CFG).params, CFG)
    raw = path.read_bytes().replace(b"llama.block_count", b"llama.block_coun_")
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert str(e.value) == f"{path}: metadata llama.block_count must be a positive integer, got None"


@pytest.mark.parametrize("qtype, at_byte, what", [
    (Q.Q8_0, 0, "scale"), (Q.Q4_0, 0, "scale"), (Q.Q4_1, 2, "minimum"), (Q.Q5_0, 0, "scale"), (Q.Q5_1, 2, "minimum"),
    (Q.Q4_K, 0, "scale"), (Q.Q4_K, 2, "minimum"), (Q.Q5_K, 2, "minimum"), (Q.Q6_K, 208, "scale")])
@pytest.mark.parametrize("bits", [0x7E00, 0x7C00, 0xFC00])   # float16 NaN, +inf, -inf
def test_a_nan_or_infinite_block_scale_is_refused_when_kept_quantized(tmp_path, qtype, at_byte, what, bits):
    """(was: loaded into the blocks unchecked; only the dequantizing load refused it)"""
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(CFG).params, CFG, qtype)
    Llama.from_pretrained(path, quantized=True)   # (the file as written loads)
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    _patched(path, tensor.data_offset + 3 * block_bytes + at_byte, "<H", bits)   # the 4th block of the tensor
    row, block = divmod(3, CFG.dim // block_weights)
    with pytest.raises(CheckpointError) as e:
        Llama.from_pretrained(path, quantized=True)
    assert str(e.value) == (f"{path}: tensor 'blk.1.ffn_up.weight': block {block} of row {row} has a NaN or "
                            f"infinite {what} (1 such blocks)")


def test_fused_parts_in_q4_0_q5_0_and_q8_0_are_kept_together_as_q8_0(tmp_path):
    """(llama.cpp's Q4_K_M of SmolLM2-135M: q, k Q5_0 and v Q8_0 in some layers; was: that layer's
    q, k, v dequantized to float32.)  Parts in other mixed formats are dequantized."""
    from npllama.layers.quantized_linear import QuantizedMatrix
    path = tmp_path / "m.gguf"
    mixed = {"model.layers.0.self_attn.v_proj.weight": Q.Q8_0, "model.layers.0.self_attn.k_proj.weight": Q.Q4_0,
             "model.layers.0.mlp.up_proj.weight": Q.Q8_0,
             "model.layers.1.self_attn.v_proj.weight": Q.Q4_1}        # (Q4_1 has an offset: not Q8_0)
    write_gguf(path, random_model(CFG).params, CFG, Q.Q5_0, qtypes=mixed)
    dense = Llama.from_pretrained(path, dtype=np.float64)
    kept = Llama.from_pretrained(path, dtype=np.float64, quantized=True)
    assert kept.layers[0]["wqkv"].qtype == "Q8_0" and kept.layers[0]["w_gate_up"].qtype == "Q8_0"
    assert not isinstance(kept.layers[1]["wqkv"], QuantizedMatrix) and kept.layers[1]["w_gate_up"].qtype == "Q5_0"
    for name, p in kept.params.items():
        got = p.dequantize(np.float64) if isinstance(p, QuantizedMatrix) else p
        np.testing.assert_array_equal(got, dense.params[name], err_msg=name)
    tokens = np.array([[1, 5, 9, 63, 0, 7]])
    assert relative_error(kept.eval().forward(tokens), dense.eval().forward(tokens)) <= 1e-12


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_every_kept_format_loads_in_its_blocks_and_computes_the_dequantized_model(tmp_path, qtype):
    """quantized=True keeps each matrix in its blocks (deq(W) = the dequantizing load's, Q/K rows
    unpermuted alike); the model on them = the float64 model on the dequantized weights."""
    from npllama.layers.quantized_linear import QuantizedMatrix
    path = tmp_path / "m.gguf"
    write_gguf(path, random_model(CFG).params, CFG, qtype)
    dense = Llama.from_pretrained(path, dtype=np.float64)
    kept = Llama.from_pretrained(path, dtype=np.float64, quantized=True)
    matrices = [n for n, p in kept.params.items() if isinstance(p, QuantizedMatrix)]
    assert len(matrices) == 7 * CFG.n_layers + 2 and {kept.params[n].qtype for n in matrices} == {qtype.name}
    for name in matrices:
        np.testing.assert_array_equal(kept.params[name].dequantize(np.float64), dense.params[name], err_msg=name)
    tokens = np.array([[1, 5, 9, 63, 0, 7]])
    logits = dense.eval().forward(tokens)
    assert relative_error(kept.eval().forward(tokens), logits) <= 1e-12
