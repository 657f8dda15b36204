"""Hostile and broken files, fuzzed with hypothesis: every loader either loads the file or raises an
npllama error (a ``NpllamaError``) whose message names the file -- never another exception, a hang,
or an allocation out of proportion to the files' size.

Memory is checked two ways: ``bounded_memory`` lowers the address-space limit while a loader runs
(so a loader that trusts a size field hits ``MemoryError``, which fails the test, instead of the
OOM killer), and ``tracemalloc`` (which sees NumPy's buffers) measures the peak, asserted to be a
small multiple of the bytes on disk.

NPLLAMA_FUZZ_EXAMPLES scales the number of examples per fuzz test (default 60).
"""
import contextlib
import json
import os
import resource
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import npllama
from npllama.errors import CheckpointError, ConfigError, InputError, NpllamaError
from npllama.formats.hf import load_config, weight_files
from npllama.formats.safetensors import CHECKSUM_KEY, read_safetensors, write_safetensors

N_EXAMPLES = int(os.environ.get("NPLLAMA_FUZZ_EXAMPLES", "60"))
fuzz_settings = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=False,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])

TINY = dict(vocab_size=19, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=12, max_seq_len=16)


# ---- helpers -----------------------------------------------------------------------------------
def vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded_memory(extra_bytes=768 << 20):
    """Let the process map at most ``extra_bytes`` more address space than it holds now: a loader
    that believes a size field claiming gigabytes gets MemoryError instead of exhausting RAM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def expect_load_or_clear_error(load, must_name, max_peak_bytes=None):
    """Run ``load()``; return its result or the NpllamaError it raised. Anything else fails the test,
    and so does an error whose message does not contain ``must_name`` (the file or directory)."""
    tracemalloc.start()
    try:
        with bounded_memory():
            result = load()
    except NpllamaError as e:
        result = e
        message = str(e)
        assert must_name in message, f"error does not name {must_name!r}: {message}"
        assert "\n" not in message.strip(), f"error is not one line: {message!r}"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if max_peak_bytes is not None:
        assert peak <= max_peak_bytes, f"peak allocation {peak} bytes > bound {max_peak_bytes}"
    return result


def weight_bound(directory: Path) -> int:
    """Loading may use a few times the bytes of the files (params + grads + a conversion buffer,
    float64 from bfloat16 is 4x per copy) but never more."""
    return 24 * dir_bytes(directory) + (4 << 20)


class Quiet(dict):
    """A dict that hypothesis prints as its keys only (falsifying examples stay readable)."""

    def __repr__(self):
        return f"<files {sorted(self)}>"


class QuietLlama(npllama.Llama):
    def __repr__(self):
        return "<tiny Llama>"


@pytest.fixture(scope="module")
def tiny_model():
    return QuietLlama(npllama.LlamaConfig(**TINY), seed=5)


@pytest.fixture(scope="module")
def tiny_files(tiny_model, tmp_path_factory):
    """{file name: bytes} of the tiny model as save_pretrained writes it."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(d)
    return Quiet({p.name: p.read_bytes() for p in d.iterdir()})


@contextlib.contextmanager
def model_dir(files: dict):
    with tempfile.TemporaryDirectory(prefix="npllama-fuzz-") as d:
        d = Path(d)
        for name, data in files.items():
            (d / name).write_bytes(data)
        yield d


# ---- JSON values, including the ones json.dumps cannot produce ----------------------------------
RAW_JSON_TOKENS = [
    "1" * 5000,                      # more digits than Python's int parser allows by default
    "-" + "9" * 400,                 # huge negative integer
    "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e-400", "-0.0",
    "[" * 5000 + "]" * 5000,         # deeper than the recursion limit
    '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\ud800"',                     # lone surrogate
    "18446744073709551616", "9223372036854775807", "2147483648", "4294967296",
]

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 16, 2**31, 2**32 + 8, 2**40, 10**12]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, 1e-5, 1e300, 8.0]),
    st.text(max_size=12),
    st.sampled_from(["llama", "silu", "llama3", "default", "LlamaForCausalLM", "gelu", "dynamic"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def with_raw_tokens(obj, raw: dict) -> str:
    """json.dumps(obj), then replace each placeholder string "@@i@@" by raw JSON text."""
    text = json.dumps(obj)
    for placeholder, token in raw.items():
        text = text.replace(json.dumps(placeholder), token)
    return text


@st.composite
def mutated_json_text(draw, base: dict, interesting_keys):
    """The JSON text of ``base`` with some keys deleted, some set to junk (or to raw JSON text)."""
    obj = dict(base)
    raw = {}
    keys = sorted(set(base) | set(interesting_keys))
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        action = draw(st.sampled_from(["delete", "value", "raw"]))
        if action == "delete":
            obj.pop(key, None)
        elif action == "value":
            obj[key] = draw(json_values)
        else:
            placeholder = f"@@{len(raw)}@@"
            raw[placeholder] = draw(st.sampled_from(RAW_JSON_TOKENS))
            obj[key] = placeholder
    return with_raw_tokens(obj, raw)


def mutate_bytes(draw, data: bytes, hot_region: int | None = None) -> bytes:
    """Truncate, flip bits (half of them inside ``hot_region`` bytes at the start), or splice."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "splice", "overwrite"]))
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            hi = hot_region if hot_region and draw(st.booleans()) else len(data)
            pos = draw(st.integers(0, hi - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "splice":
        start = draw(st.integers(0, len(data)))
        return bytes(data[:start]) + draw(st.binary(max_size=64)) + bytes(data[start + draw(st.integers(0, 64)):])
    pos = draw(st.integers(0, len(data) - 1))
    chunk = draw(st.binary(min_size=1, max_size=16))
    data[pos:pos + len(chunk)] = chunk
    return bytes(data)


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    if not isinstance(header, (str, bytes)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


# ---- config.json ---------------------------------------------------------------------------------
HF_CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "rope_scaling", "rope_parameters", "tie_word_embeddings", "model_type", "architectures",
                  "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp", "eos_token_id", "bos_token_id"]


@fuzz_settings
@given(data=st.data())
def test_fuzz_config_json(tiny_model, tiny_files, data):
    base = json.loads(tiny_files["config.json"])
    text = data.draw(st.one_of(
        mutated_json_text(base, HF_CONFIG_KEYS),
        json_values.map(json.dumps),
        st.sampled_from(RAW_JSON_TOKENS),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    ))
    encoded = text.encode("utf-8", "surrogatepass") if data.draw(st.booleans()) else text.encode("latin-1", "replace")
    with model_dir({**tiny_files, "config.json": encoded}) as d:
        cfg = expect_load_or_clear_error(lambda: load_config(d), "config.json")
        loaded = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), str(d),
                                            max_peak_bytes=weight_bound(d))
        if isinstance(cfg, NpllamaError):
            assert isinstance(loaded, NpllamaError)
        elif not isinstance(loaded, NpllamaError):
            # It loaded, so the shapes matched the weights: the same model, bit for bit.
            np.testing.assert_array_equal(loaded.flat_params, tiny_model.flat_params)


@pytest.mark.parametrize("edit, match", [
    ({"vocab_size": 10**12}, "config.json implies"),                 # terabytes of parameters
    ({"num_hidden_layers": 10**9}, "config.json implies"),
    ({"hidden_size": 2**40, "num_attention_heads": 2**39}, "config.json implies"),
    ({"head_dim": "x", "num_attention_heads": 10**10}, "head_dim"),  # str * huge int
    ({"head_dim": [1], "num_attention_heads": 10**10}, "head_dim"),
    ({"vocab_size": 19.0}, "vocab_size"),
    ({"num_attention_heads": None}, "num_attention_heads"),   # found by the fuzzer: was a TypeError
    ({"hidden_size": None}, "hidden_size"),
    ({"vocab_size": True}, "vocab_size"),
    ({"rms_norm_eps": True}, "norm_eps"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 1e309}, "rope_parameters": None}, "original_max"),
    ({"rope_scaling": [1, 2], "rope_parameters": None}, "rope_scaling"),
])
def test_config_json_absurd_values(tiny_files, edit, match):
    hf = json.loads(tiny_files["config.json"])
    hf.update(edit)
    with model_dir({**tiny_files, "config.json": json.dumps(hf).encode()}) as d:
        err = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), "config.json",
                                         max_peak_bytes=weight_bound(d))
        assert isinstance(err, (ConfigError, CheckpointError)), err
        assert match in str(err), str(err)


@pytest.mark.parametrize("raw", RAW_JSON_TOKENS + ["", "   ", "[]", "null", '"llama"', "\xff\xfe{}"], ids=lambda raw: f"{raw[:12]!r}-{len(raw)}")
def test_config_json_raw_junk(tiny_files, raw):
    with model_dir({**tiny_files, "config.json": raw.encode("utf-8", "surrogatepass")}) as d:
        err = expect_load_or_clear_error(lambda: load_config(d), "config.json")
        assert isinstance(err, NpllamaError)


def test_config_from_dict_junk():
    for junk in ([1, 2], "x", None, {"dim": "8"}, {"nonsense": 1}, {1: 2}):
        with pytest.raises(ConfigError):
            npllama.LlamaConfig.from_dict(junk)


# ---- model.safetensors ---------------------------------------------------------------------------
@fuzz_settings
@given(data=st.data())
def test_fuzz_safetensors_bytes(tiny_model, tiny_files, data):
    raw = tiny_files["model.safetensors"]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    corrupt = mutate_bytes(data.draw, raw, hot_region=header_end)
    with model_dir({**tiny_files, "model.safetensors": corrupt}) as d:
        loaded = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), "model.safetensors",
                                            max_peak_bytes=weight_bound(d))
        if not isinstance(loaded, NpllamaError) and CHECKSUM_KEY.encode() in corrupt[:header_end]:
            # Only a change the header's JSON ignores (say, in the metadata) may load, and then the
            # weights are exactly the saved ones: the checksum catches any change to the data.
            # (A flip inside the key's name leaves a file without npllama's checksum, which loads
            # unverified like any Hugging Face file: seen at 1000 examples, with a second flip in
            # the data.)
            np.testing.assert_array_equal(loaded.flat_params, tiny_model.flat_params)


def test_safetensors_data_bit_flip_is_detected(tiny_files):
    raw = bytearray(tiny_files["model.safetensors"])
    raw[-3] ^= 0x01   # the low mantissa bit of the last weight: still a finite float
    with model_dir({**tiny_files, "model.safetensors": bytes(raw)}) as d:
        with pytest.raises(CheckpointError, match="model.safetensors.*checksum"):
            npllama.Llama.from_pretrained(d)


def test_safetensors_header_with_a_name_twice_is_refused(tiny_files):
    """One flipped bit in a layer number ('layers.0' -> 'layers.1') gives two tensors one name; JSON
    parsers keep the last, so a tensor would vanish or be loaded into the wrong layer."""
    raw = tiny_files["model.safetensors"]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    header = raw[8:header_end]
    name = b'"model.layers.0.mlp.gate_proj.weight"'
    assert header.count(name) == 1
    corrupt = raw[:8] + header.replace(name, name.replace(b"layers.0", b"layers.1")) + raw[header_end:]
    with model_dir({**tiny_files, "model.safetensors": corrupt}) as d:
        with pytest.raises(CheckpointError, match="model.safetensors.*duplicate key"):
            npllama.Llama.from_pretrained(d)


def _tiny_tensors(tiny_model):
    return Quiet({name: tiny_model.params[name] for name, _ in tiny_model.layout})


@st.composite
def hostile_headers(draw, tensors: dict):
    """A safetensors file whose header is valid JSON with one entry (or the whole header) wrong."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        blobs.append(arr.astype("<f4").tobytes())
    data = b"".join(blobs)
    victim = draw(st.sampled_from(sorted(header)))
    entry = header[victim]
    kind = draw(st.sampled_from([
        "dtype", "shape", "offsets", "overlap", "extra_key", "entry_junk", "metadata", "not_object",
        "terabyte_shape", "drop", "add", "length_field"]))
    length = None
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(["I32", "F16", "BF16", "F64", "U8", "BOOL", "F8_E4M3",
                                                         "f32", "", "I64"]), json_values))
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(json_values, st.lists(st.integers(-3, 2**62), max_size=9)))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.one_of(json_values, st.lists(st.integers(-2**63, 2**64), max_size=3)))
    elif kind == "overlap":
        other = header[draw(st.sampled_from(sorted(header)))]
        if other is not entry:
            start = other["data_offsets"][0]
            entry["data_offsets"] = [start, start + entry["data_offsets"][1] - entry["data_offsets"][0]]
    elif kind == "extra_key":
        entry[draw(st.text(max_size=5))] = draw(json_values)
    elif kind == "entry_junk":
        header[victim] = draw(json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    elif kind == "not_object":
        header = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif kind == "terabyte_shape":
        entry["shape"] = [2**20, 2**20, 2**3]
        entry["data_offsets"] = [0, 2**45]
    elif kind == "drop":
        del header[victim]
    elif kind == "add":
        header[draw(st.text(min_size=1, max_size=30))] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    else:
        length = draw(st.sampled_from([0, 1, 2**40, 2**63, 2**64 - 1, 100 * 2**20 + 1]))
    return safetensors_bytes(header, data, length)


@fuzz_settings
@given(data=st.data())
def test_fuzz_safetensors_headers(tiny_model, tiny_files, data):
    corrupt = data.draw(hostile_headers(_tiny_tensors(tiny_model)))
    with model_dir({**tiny_files, "model.safetensors": corrupt}) as d:
        loaded = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), str(d),
                                            max_peak_bytes=weight_bound(d))
        if not isinstance(loaded, NpllamaError):
            np.testing.assert_array_equal(loaded.flat_params, tiny_model.flat_params)
        # the reader on its own, too
        expect_load_or_clear_error(lambda: read_safetensors(d / "model.safetensors"), "model.safetensors",
                                   max_peak_bytes=weight_bound(d))


@pytest.mark.parametrize("blob, match", [
    (b"", "truncated"),
    (b"\x00" * 7, "truncated"),
    (struct.pack("<Q", 2**40) + b"{}", "claims"),                      # header claiming a terabyte
    (struct.pack("<Q", 2**64 - 1) + b"{}", "claims"),
    (safetensors_bytes(b"\xff\xfe{}"), "header"),                       # not UTF-8
    (safetensors_bytes("[]"), "not a JSON object"),
    (safetensors_bytes("null"), "not a JSON object"),
    (safetensors_bytes("1" * 5000), "header"),
    (safetensors_bytes("[" * 100000 + "]" * 100000), "header"),
    (safetensors_bytes({"x": {"dtype": "F32", "shape": [2**20, 2**20, 2**20], "data_offsets": [0, 2**62]}}),
     "offsets"),
    (safetensors_bytes({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    (safetensors_bytes({"__metadata__": [1, 2]}), "metadata"),
    (safetensors_bytes({"__metadata__": {"format": 7}}), "metadata"),
], ids=lambda v: None if isinstance(v, str) else f"{len(v)}-bytes")
def test_safetensors_hostile_files(tmp_path, blob, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    err = expect_load_or_clear_error(lambda: read_safetensors(path), str(path), max_peak_bytes=(1 << 20) + 40 * len(blob))
    assert isinstance(err, CheckpointError)
    assert match in str(err), str(err)


def test_special_files_are_refused_not_read(tmp_path, tiny_files):
    """A FIFO would block forever on open; /dev/zero would never end; a directory is not a file."""
    with model_dir(tiny_files) as d:
        (d / "model.safetensors").unlink()
        os.mkfifo(d / "model.safetensors")
        with pytest.raises(CheckpointError, match="model.safetensors.*not a regular file"):
            npllama.Llama.from_pretrained(d)
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to("/dev/zero")
        with pytest.raises(CheckpointError, match="model.safetensors"):
            npllama.Llama.from_pretrained(d)
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").write_bytes(tiny_files["model.safetensors"])
        (d / "config.json").unlink()
        os.mkfifo(d / "config.json")
        with pytest.raises(CheckpointError, match="config.json.*not a regular file"):
            npllama.Llama.from_pretrained(d)


def test_wrong_dtype_and_duplicates_across_shards(tiny_model, tiny_files):
    tensors = _tiny_tensors(tiny_model)
    with model_dir(tiny_files) as d:
        write_safetensors(d / "model.safetensors", {k: v.astype(np.int32) for k, v in tensors.items()})
        with pytest.raises(CheckpointError, match="floating-point"):
            npllama.Llama.from_pretrained(d)
        write_safetensors(d / "model.safetensors", {k: v.astype(np.float64) for k, v in tensors.items()})
        np.testing.assert_array_equal(npllama.Llama.from_pretrained(d).flat_params, tiny_model.flat_params)
        # the same tensor in two shards: which one wins would be an accident of file order
        (d / "model.safetensors").unlink()
        names = sorted(tensors)
        write_safetensors(d / "a.safetensors", {n: tensors[n] for n in names})
        write_safetensors(d / "b.safetensors", {names[0]: tensors[names[0]]})
        index = {"weight_map": {**{n: "a.safetensors" for n in names}, names[0]: "b.safetensors"}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=f"{names[0]}.*both"):
            npllama.Llama.from_pretrained(d)


# ---- model.safetensors.index.json ----------------------------------------------------------------
SHARD_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
hostile_shard_names = st.one_of(
    st.sampled_from(SHARD_NAMES),
    st.sampled_from(["../escape.safetensors", "/etc/passwd", "/dev/zero", ".", "..", "", "sub/x.safetensors",
                     "a/../" + SHARD_NAMES[0], "./" + SHARD_NAMES[0], "nul\x00.safetensors", "x" * 5000,
                     "link-out.safetensors", "link-in.safetensors", "fifo.safetensors", "dir.safetensors",
                     "link-dev.safetensors", "missing.safetensors", "C:\\x.safetensors", "~/x.safetensors"]),
    st.text(max_size=20),
    json_values,
)


@st.composite
def hostile_index(draw, names):
    kind = draw(st.sampled_from(["values", "values", "structure"]))
    if kind == "structure":
        return draw(st.one_of(json_values, st.fixed_dictionaries({"weight_map": json_values})))
    half = len(names) // 2
    weight_map = {n: SHARD_NAMES[i >= half] for i, n in enumerate(names)}
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        weight_map[name] = draw(hostile_shard_names)
    return {"metadata": {"total_size": 0}, "weight_map": weight_map}


@fuzz_settings
@given(data=st.data())
def test_fuzz_shard_index(tiny_model, tiny_files, data):
    tensors = _tiny_tensors(tiny_model)
    names = sorted(tensors)
    index = data.draw(hostile_index(names))
    with tempfile.TemporaryDirectory(prefix="npllama-fuzz-outside-") as outside:
        (Path(outside) / "escape.safetensors").write_bytes(tiny_files["model.safetensors"])
        with model_dir({"config.json": tiny_files["config.json"]}) as d:
            half = len(names) // 2
            write_safetensors(d / SHARD_NAMES[0], {n: tensors[n] for n in names[:half]})
            write_safetensors(d / SHARD_NAMES[1], {n: tensors[n] for n in names[half:]})
            (d / "link-out.safetensors").symlink_to(Path(outside) / "escape.safetensors")
            (d / "link-in.safetensors").symlink_to(d / SHARD_NAMES[0])
            (d / "link-dev.safetensors").symlink_to("/dev/zero")
            os.mkfifo(d / "fifo.safetensors")
            (d / "dir.safetensors").mkdir()
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
            loaded = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), str(d),
                                                max_peak_bytes=weight_bound(d))
            if not isinstance(loaded, NpllamaError):
                np.testing.assert_array_equal(loaded.flat_params, tiny_model.flat_params)
                # only names of regular files inside the directory can have been followed
                for path in weight_files(d):
                    assert path.parent == d.resolve() and path.is_file()


@pytest.mark.parametrize("shard, match", [
    ("../escape.safetensors", "outside"),
    ("/tmp/x.safetensors", "outside|absolute"),
    ("link-out.safetensors", "outside"),
    ("nul\x00.safetensors", "invalid shard name"),
    ("\n", "invalid shard name"),       # found by test_fuzz_shard_index: the error was two lines
    ("tab\t.safetensors", "invalid shard name"),
    ("x" * 5000, "safetensors.index.json"),
    (3, "invalid shard name"),
])
def test_shard_index_refuses(tiny_model, tiny_files, shard, match):
    tensors = _tiny_tensors(tiny_model)
    with tempfile.TemporaryDirectory() as outside, model_dir({"config.json": tiny_files["config.json"]}) as d:
        (Path(outside) / "evil.safetensors").write_bytes(tiny_files["model.safetensors"])
        (d / "link-out.safetensors").symlink_to(Path(outside) / "evil.safetensors")
        write_safetensors(d / "ok.safetensors", tensors)
        weight_map = {n: "ok.safetensors" for n in tensors}
        weight_map[sorted(tensors)[0]] = shard
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=match) as err:
            npllama.Llama.from_pretrained(d)
        assert "\n" not in str(err.value)


def test_hugging_face_cache_symlinks_still_load(tiny_model, tiny_files, tmp_path):
    """The HF hub cache keeps files in blobs/ and symlinks them from snapshots/<rev>/; that is allowed."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name, data in tiny_files.items():
        (repo / "blobs" / f"blob-{name}").write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / f"blob-{name}")
    np.testing.assert_array_equal(npllama.Llama.from_pretrained(snap).flat_params, tiny_model.flat_params)


# ---- tokenizer.json --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_text():
    from npllama.tokenizer import Tokenizer
    return Tokenizer.train("hello world, hello there. " * 50 + "the quick brown fox\n" * 20, 280).to_str()


def _replace_random_subtree(draw, obj):
    """Replace one randomly chosen node of a JSON tree by a random JSON value (or delete it)."""
    if not isinstance(obj, (dict, list)) or not obj or draw(st.integers(0, 3)) == 0:
        return draw(json_values)
    if isinstance(obj, dict):
        key = draw(st.sampled_from(sorted(obj)))
        if draw(st.integers(0, 5)) == 0:
            return {k: v for k, v in obj.items() if k != key}
        return {**obj, key: _replace_random_subtree(draw, obj[key])}
    i = draw(st.integers(0, len(obj) - 1))
    return obj[:i] + [_replace_random_subtree(draw, obj[i])] + obj[i + 1:]


@fuzz_settings
@given(data=st.data())
def test_fuzz_tokenizer_json(tokenizer_text, data):
    from npllama.tokenizer import Tokenizer
    if data.draw(st.booleans()):
        corrupt = json.dumps(_replace_random_subtree(data.draw, json.loads(tokenizer_text))).encode()
    else:
        corrupt = mutate_bytes(data.draw, tokenizer_text.encode())
    with model_dir({"tokenizer.json": corrupt}) as d:
        path = d / "tokenizer.json"
        tok = expect_load_or_clear_error(lambda: Tokenizer.from_file(path), str(path),
                                         max_peak_bytes=64 * len(corrupt) + (8 << 20))
        if not isinstance(tok, NpllamaError):
            # A tokenizer that loads must also work, or fail with an npllama error.
            try:
                ids = tok.encode("hello world")
                tok.decode(ids)
            except NpllamaError:
                pass


def test_tokenizer_error_quoting_a_newline_stays_one_line(tokenizer_text, tmp_path):
    """The tokenizers library quotes the bad value in its message; a newline there (found by
    test_fuzz_tokenizer_json at 1000 examples) must not split npllama's one-line error."""
    from npllama.tokenizer import Tokenizer
    bad = json.loads(tokenizer_text)
    bad["padding"] = ["\n"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="tokenizer.json") as err:
        Tokenizer.from_file(path)
    assert "\n" not in str(err.value) and "\\n" in str(err.value)


def test_tokenizer_json_junk(tmp_path):
    from npllama.tokenizer import Tokenizer
    path = tmp_path / "tokenizer.json"
    for junk in [b"", b"\xff\xfe", b"[]", b"null", b"1" * 5000, b"[" * 100000, b'{"model": 5}']:
        path.write_bytes(junk)
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            Tokenizer.from_file(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_file(path)


def test_tokenizer_larger_than_model_vocab_is_refused(tiny_files, tokenizer_text):
    """A tokenizer that emits ids the embedding has no row for would fail on the first prompt."""
    with model_dir({**tiny_files, "tokenizer.json": tokenizer_text.encode()}) as d:
        with pytest.raises(CheckpointError, match="tokenizer.json.*280.*vocab_size.*19"):
            npllama.Llama.from_pretrained(d)


# ---- model inputs ----------------------------------------------------------------------------------
def _valid(arr, cfg) -> bool:
    """The input contract of Llama.forward, written independently of its checks."""
    a = np.asarray(arr) if not isinstance(arr, list) else None
    if a is None:
        try:
            a = np.array(arr)
        except ValueError:
            return False
    return (a.dtype.kind in "iu" and a.ndim == 2 and a.shape[0] > 0 and 0 < a.shape[1] <= cfg.max_seq_len
            and bool(np.all((a >= 0) & (a < cfg.vocab_size))))


input_dtypes = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                                np.dtype(">i4"), np.dtype(">i8"), np.float32, np.float64, np.bool_, np.complex64,
                                np.float16])


@st.composite
def model_inputs(draw, cfg):
    kind = draw(st.sampled_from(["array", "array", "array", "list", "object", "strings"]))
    if kind in ("array", "list"):
        ndim = draw(st.sampled_from([2, 2, 2, 0, 1, 3]))
        shape = tuple(draw(st.integers(0, 4 if i == 0 else cfg.max_seq_len + 2)) for i in range(ndim))
        dtype = np.dtype(draw(input_dtypes))
        lo, hi = (-3, cfg.vocab_size + 2)
        if dtype.kind == "u":
            lo = 0
        if dtype == np.int8:
            hi = 127
        values = draw(st.lists(st.integers(lo, hi), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        arr = np.array(values, dtype=np.int64).reshape(shape).astype(dtype)
        layout = draw(st.sampled_from(["c", "fortran", "strided", "readonly"]))
        if layout == "fortran":
            arr = np.asfortranarray(arr)
        elif layout == "strided" and ndim >= 1:
            arr = np.repeat(arr, 2, axis=-1)[..., ::2]
        elif layout == "readonly":
            arr.flags.writeable = False
        return arr.tolist() if kind == "list" else arr
    if kind == "object":
        return draw(st.sampled_from([
            [[1, 2], [3]],                       # ragged
            [[1, None]], [[1, "2"]], [[2**70]], [[1.5, 2]], [[True, False]],
            np.array([[1, 2]], dtype=object), None, "12", 3, [[]], [], np.int64(3),
        ]))
    return np.array([["a", "b"]])


@pytest.fixture(scope="module")
def input_model():
    cfg = npllama.LlamaConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, hidden_dim=8, max_seq_len=5)
    return npllama.Llama(cfg, seed=2)


@settings(max_examples=max(N_EXAMPLES, 100), deadline=None)
@given(data=st.data())
def test_fuzz_model_inputs(input_model, data):
    cfg = input_model.config
    tokens = data.draw(model_inputs(cfg))
    valid = _valid(tokens, cfg)
    try:
        logits = input_model.forward(tokens)
    except InputError as e:
        assert not valid, f"valid input refused: {e}"
        message = str(e)
        assert "tokens" in message and "\n" not in message
        return
    assert valid, f"invalid input accepted: {tokens!r}"
    reference = np.ascontiguousarray(np.asarray(tokens), dtype=np.int64)
    assert logits.shape == (*reference.shape, cfg.vocab_size)
    np.testing.assert_array_equal(logits, input_model.forward(reference))
    # the same contract for targets, where -100 means "ignore"
    loss, _ = input_model.loss_and_grad(reference, tokens)
    assert np.isfinite(loss)


def test_valid_edges_full_context_batch_and_ignore(input_model):
    cfg = input_model.config
    full = np.arange(cfg.max_seq_len)[None] % cfg.vocab_size
    assert input_model.forward(full).shape == (1, cfg.max_seq_len, cfg.vocab_size)
    batch = np.stack([full[0], full[0][::-1]])
    logits = input_model.forward(batch)
    np.testing.assert_allclose(logits[1:], input_model.forward(batch[1:]), rtol=1e-5, atol=1e-6)
    targets = np.full_like(batch, -100)
    targets[0, -1] = 3
    loss, _ = input_model.loss_and_grad(batch, targets.astype(np.int16))
    assert np.isfinite(loss) and loss > 0
    with pytest.raises(InputError, match="targets has id -101"):
        input_model.loss_and_grad(batch, targets - 1)
    with pytest.raises(InputError, match="targets"):
        input_model.loss_and_grad(batch, targets.astype(np.float32))


# ---- training state (--resume) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """{file name: bytes} of a 2-step run's directory, and the corpus it was trained on."""
    from npllama.data import load_text
    from npllama.train import TrainConfig, train
    d = tmp_path_factory.mktemp("state")
    (d / "corpus.txt").write_text(load_text()[:20000])
    run_dir = d / "run"
    train(TrainConfig(data=str(d / "corpus.txt"), dim=16, n_layers=1, n_heads=2, vocab_size=300, seq_len=16,
                      batch_size=2, dropout=0.1, steps=2, checkpoint_interval=1, eval_interval=0, sample_tokens=0,
                      out_dir=str(run_dir)), progress=False, verbose=False)
    return Quiet({p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()})


def _load_run_or_error(files):
    from npllama.train import load_run
    with model_dir(files) as d:
        run = expect_load_or_clear_error(lambda: load_run(d, verbose=False), "",
                                         max_peak_bytes=64 * dir_bytes(d) + (16 << 20))
        if not isinstance(run, NpllamaError):
            # what the training loop relies on
            assert isinstance(run.step, int) and run.step >= 0
            assert isinstance(run.total_steps, int) and run.total_steps >= run.step
            assert run.optimizer.t == run.step
            x, y = run.sampler.next_batch()
            assert x.shape == y.shape == (run.config.batch_size, run.config.seq_len)
        return run


@fuzz_settings
@given(data=st.data())
def test_fuzz_training_state(saved_run, data):
    state_text = saved_run["training_state.json"]
    if data.draw(st.booleans()):
        state = json.loads(state_text)
        if data.draw(st.booleans()):
            # hit the fields that have no checksum: everything in the state itself
            key = data.draw(st.sampled_from(sorted(state)))
            state[key] = _replace_random_subtree(data.draw, state[key])
        else:
            state = _replace_random_subtree(data.draw, state)
        corrupt = json.dumps(state).encode()
    else:
        corrupt = mutate_bytes(data.draw, state_text)
    _load_run_or_error({**saved_run, "training_state.json": corrupt})


@fuzz_settings
@given(data=st.data())
def test_fuzz_optimizer_file_matching_state_checksum(saved_run, data):
    """A corrupt optimizer file whose SHA-256 the state agrees with (written so on purpose, or
    corrupted before hashing) is still refused by its own checks, or loads unchanged."""
    import hashlib
    state = json.loads(saved_run["training_state.json"])
    raw = saved_run["optimizer.safetensors"]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    corrupt = mutate_bytes(data.draw, raw, hot_region=header_end)
    state["files_sha256"]["optimizer.safetensors"] = hashlib.sha256(corrupt).hexdigest()
    run = _load_run_or_error({**saved_run, "training_state.json": json.dumps(state).encode(),
                              "optimizer.safetensors": corrupt})
    if not isinstance(run, NpllamaError) and CHECKSUM_KEY.encode() in corrupt[:header_end]:
        # (with the checksum key's name itself corrupted the file loads unverified, as in
        # test_fuzz_safetensors_bytes; seen at 1000 examples)
        original = {k: v for k, (_, v) in read_safetensors_bytes(raw).items()}
        for name in run.optimizer.params:
            np.testing.assert_array_equal(run.optimizer.m[name], original[f"m.{name}"])


def read_safetensors_bytes(raw: bytes):
    with model_dir({"x.safetensors": raw}) as d:
        return {k: (t, v.copy()) for k, (t, v) in read_safetensors(d / "x.safetensors").items()}


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(step=-1), "step"),
    (lambda s: s.update(step=10**30), "step"),
    (lambda s: s.update(total_steps="many"), "total_steps"),
    (lambda s: s.update(total_steps=1), "total_steps"),
    (lambda s: s.update(format="pickle"), "training state"),
    (lambda s: s["files_sha256"].update({"model.safetensors": "0" * 64}), "model.safetensors"),
    (lambda s: s["files_sha256"].update({"../../etc/passwd": "0" * 64}), "files_sha256"),
    (lambda s: s.update(files_sha256=None), "files_sha256"),
    (lambda s: s.update(data=None), "data"),
    (lambda s: s.update(dropout_rng={"bit_generator": "PCG64", "state": {"state": 2**200, "inc": 1},
                                     "has_uint32": 0, "uinteger": 0}), "dropout"),
    (lambda s: s.update(sampler=[1, 2]), "sampler"),
    (lambda s: s.pop("plan"), "plan"),          # found by test_fuzz_training_state: was a KeyError
    (lambda s: s.update(plan=[]), "plan"),
    (lambda s: s["train_config"].update(lr="fast"), "lr"),
    (lambda s: s["train_config"].update(preset=[]), "preset"),   # found by the fuzzer: was a TypeError
    (lambda s: s["train_config"].update(dtype={"a": 1}), "dtype"),
    (lambda s: s["train_config"].update(batch_size=10**12), "batch"),
])
def test_training_state_refused(saved_run, edit, match):
    state = json.loads(saved_run["training_state.json"])
    edit(state)
    err = _load_run_or_error({**saved_run, "training_state.json": json.dumps(state).encode()})
    assert isinstance(err, NpllamaError), "loaded"
    assert match in str(err), str(err)


# ---- --config files (TOML and JSON) --------------------------------------------------------------
CONFIG_TOML = """# a valid training config
vocab_size = 300
dim = 16
n_layers = 1
n_heads = 2
seq_len = 16
batch_size = 2
steps = 3
lr = 0.003
schedule = "cosine"
dropout = 0.1
tie_embeddings = true
"""


@fuzz_settings
@given(data=st.data())
def test_fuzz_config_file(tmp_path_factory, data):
    """`npllama train --config FILE`: a mutated TOML or JSON file either gives a valid TrainConfig
    or a ConfigError naming the file (the command line turns it into one `npllama: error:` line)."""
    import tomllib
    from npllama.train import TrainConfig, read_config_file
    as_json = data.draw(st.booleans())
    values = tomllib.loads(CONFIG_TOML)
    if as_json:
        if data.draw(st.booleans()):
            raw = json.dumps(_replace_random_subtree(data.draw, values)).encode()
        else:
            raw = mutate_bytes(data.draw, json.dumps(values).encode())
    else:
        raw = mutate_bytes(data.draw, CONFIG_TOML.encode())
    path = tmp_path_factory.mktemp("cfg") / ("train.json" if as_json else "train.toml")
    path.write_bytes(raw)

    def load():
        try:
            return TrainConfig.from_dict(read_config_file(path), source=f"config file {path}")
        except ConfigError as e:
            assert str(path) in str(e), str(e)
            raise

    cfg = expect_load_or_clear_error(load, "", max_peak_bytes=64 * len(raw) + (8 << 20))
    if not isinstance(cfg, NpllamaError):
        assert isinstance(cfg, TrainConfig)
        assert cfg.batch_size >= 1 and cfg.seq_len >= 1 and cfg.lr > 0


# ---- size fields of every format, mutated (issue 28) ---------------------------------------------
# Each loader must check what a header implies (parameters, bytes, ranks, vocabulary) against the
# file and sane limits before allocating: a size field set to 2^31 - 1 or 2^63 is refused in
# bounded memory (bounded_memory) with an error naming the file, or loads a consistent model.
SIZE_VALUES = [0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 300, 1000, 10**6, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
SIZE_TINY = npllama.LlamaConfig(vocab_size=300, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32,
                                max_seq_len=16)


@pytest.fixture(scope="module")
def size_model():
    import warnings
    from npllama import Tokenizer
    model = QuietLlama(SIZE_TINY, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (a short text: fewer merges than asked for)
        model.tokenizer = Tokenizer.train("the cat sat on the mat, the dog on the log. " * 30, vocab_size=300)
    return model


def _integer_fields(path) -> list[tuple[int, int]]:
    """(byte position, width) of every single integer of a GGUF's header: the counts, every
    metadata integer and string/array length, every tensor's dimension count, dimensions, type and
    offset."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    found = set()
    for field in fields:
        for part in field.parts:
            if part.dtype.kind in "iu" and part.dtype.itemsize in (4, 8) and part.size <= 4:
                for k in range(part.size):
                    found.add((part.ctypes.data - base + k * part.dtype.itemsize, part.dtype.itemsize))
    return sorted(found)


@pytest.fixture(scope="module")
def gguf_file(size_model, tmp_path_factory):
    from npllama.formats.gguf_writer import write_gguf
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", SIZE_TINY, size_model.params, size_model.tokenizer)
    return path.read_bytes(), _integer_fields(path)


@fuzz_settings
@given(data=st.data())
def test_fuzz_gguf_size_fields(gguf_file, data):
    raw, fields = gguf_file
    corrupt = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 2))):
        pos, width = data.draw(st.sampled_from(fields))
        value = data.draw(st.sampled_from(SIZE_VALUES) | st.integers(0, 2 ** (8 * width) - 1))
        corrupt[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    with model_dir({"m.gguf": bytes(corrupt)}) as d:
        loaded = expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d / "m.gguf"), "m.gguf",
                                            max_peak_bytes=weight_bound(d))
        if not isinstance(loaded, NpllamaError):
            assert loaded.config.num_parameters() <= 2 * SIZE_TINY.num_parameters()


@fuzz_settings
@given(data=st.data())
def test_fuzz_llama2c_header(size_model, data):
    from npllama.formats.llama2c import write_llama2c
    version = data.draw(st.sampled_from([0, 1]))
    with model_dir({}) as d:
        raw = bytearray(write_llama2c(d / "m.bin", SIZE_TINY, size_model.params, version=version).read_bytes())
    first = 0 if version == 0 else 8
    for _ in range(data.draw(st.integers(1, 2))):
        field = data.draw(st.integers(0, 6))
        value = data.draw(st.sampled_from(SIZE_VALUES + [-1, -300, -(2**31)]) | st.integers(-2**31, 2**31 - 1))
        struct.pack_into("<I", raw, first + 4 * field, value % 2**32)
    with model_dir({"m.bin": bytes(raw)}) as d:
        expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d / "m.bin"), "m.bin",
                                   max_peak_bytes=weight_bound(d))


@fuzz_settings
@given(data=st.data())
def test_fuzz_peft_adapter_sizes(data):
    """adapter_config.json's r and lora_alpha, and the adapter matrices' shapes in its header."""
    adapter = Path(__file__).resolve().parent / "fixtures" / "lora_peft"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(adapter.parent / "hf_gqa")
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(["r", "lora_alpha"]))
        config[key] = data.draw(st.sampled_from(SIZE_VALUES + [-1, 1e308, 0.5, float("inf"), float("nan")]))
    else:   # one tensor's shape in the header (its data offsets left as they were)
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        axis = data.draw(st.integers(0, 1))
        header[name]["shape"][axis] = data.draw(st.sampled_from(SIZE_VALUES))
        raw = safetensors_bytes(header, raw[8 + n:])
    with model_dir({"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": raw}) as d:
        expect_load_or_clear_error(lambda: npllama.Llama.from_pretrained(d), str(d),
                                   max_peak_bytes=weight_bound(adapter.parent / "hf_gqa") + weight_bound(d))
