"""fastnet.codecs: the registry and the msgpack, json and pickle codecs."""
import json
import pickle
import subprocess
import sys

import pytest

from fastnet import codecs
from fastnet.codecs import available_codecs, get_codec, register_codec

np = pytest.importorskip("numpy")
msgpack = pytest.importorskip("msgpack")

NESTED = {
    "int": 1, "neg": -(2**40), "float": 2.5, "str": "héllo \u2603", "none": None,
    "bools": [True, False], "list": [1, [2, [3, {"k": "v"}]]], "empty": {}, "el": [],
}


def roundtrip(name, obj):
    c = get_codec(name)
    frames = c.dumps(obj)
    assert isinstance(frames, list) and frames
    return c.loads(frames)


# ---- registry -----------------------------------------------------------------

def test_builtins_available():
    assert {"msgpack", "json", "pickle"} <= set(available_codecs())
    assert codecs.DEFAULT_CODEC == "msgpack"
    assert get_codec("pickle").requires_auth is True
    assert get_codec("msgpack").requires_auth is False
    assert get_codec("json").requires_auth is False
    assert get_codec("json").binary is False and get_codec("msgpack").binary is True
    c = get_codec("msgpack")
    assert c.name == "msgpack" and get_codec(c) is c


def test_unknown_codec_lists_known():
    with pytest.raises(ValueError) as ei:
        get_codec("nope")
    msg = str(ei.value)
    assert "nope" in msg and "msgpack" in msg and "json" in msg and "pickle" in msg


def test_custom_codec_roundtrip():
    name = "test-repr"
    try:
        c = register_codec(name, lambda o: repr(o).encode(), lambda b: eval(bytes(b).decode()),
                           binary=False)
        assert name in available_codecs() and get_codec(name) is c
        assert c.requires_auth is False and c.binary is False
        assert c.dumps((1, "a")) == [b"(1, 'a')"]
        assert c.loads([b"(1, 'a')"]) == (1, "a")
        with pytest.raises(ValueError):
            c.loads([b"1", b"2"])
    finally:
        codecs._registry.pop(name, None)


def test_custom_multiframe_codec():
    name = "test-multi"
    try:
        c = register_codec(name, lambda o: [b"h", o], lambda fs: bytes(fs[1]), multiframe=True)
        assert c.dumps(b"xy") == [b"h", b"xy"]
        assert c.loads([b"h", b"xy"]) == b"xy"
    finally:
        codecs._registry.pop(name, None)


def test_duplicate_names():
    for builtin in ("msgpack", "json", "pickle"):
        with pytest.raises(ValueError, match="already registered"):
            register_codec(builtin, bytes, bytes)
    assert get_codec("msgpack").builtin
    name = "test-dup"
    try:
        register_codec(name, bytes, bytes)
        with pytest.raises(ValueError):
            register_codec(name, bytes, bytes)
        c2 = register_codec(name, bytes, bytes, replace=True)
        assert get_codec(name) is c2
    finally:
        codecs._registry.pop(name, None)


def test_replace_builtin_then_restore():
    orig = get_codec("json")
    try:
        c = register_codec("json", lambda o: b"x", lambda b: "x", replace=True)
        assert get_codec("json") is c
    finally:
        codecs._registry["json"] = orig


def test_bad_registration():
    with pytest.raises(ValueError):
        register_codec("", bytes, bytes)
    with pytest.raises(TypeError):
        register_codec("test-bad", None, bytes)
    assert "test-bad" not in available_codecs()


def test_import_does_not_import_numpy():
    code = "import sys, fastnet.codecs as c; c.get_codec('msgpack').dumps([1]); print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- nested round trips -----------------------------------------------------

@pytest.mark.parametrize("name", ["msgpack", "json", "pickle"])
def test_nested_roundtrip(name):
    assert roundtrip(name, NESTED) == NESTED


@pytest.mark.parametrize("name", ["msgpack", "json", "pickle"])
def test_rpc_message_shapes(name):
    req = [0, 7, "add", [2, 3], {"z": 1}]
    rep = [1, 7, None, 5]
    err = [1, 8, ["ValueError", "bad", "Traceback ..."], None]
    note = [2, "log", ["x"], {}]
    for msg in (req, rep, err, note):
        assert roundtrip(name, msg) == msg


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_tuples_become_lists(name):
    assert roundtrip(name, (1, (2, 3))) == [1, [2, 3]]


def test_pickle_keeps_types():
    obj = {"t": (1, 2), "s": {1, 2}, "b": b"\x00\xff", "ba": bytearray(b"ab"), 1.5: complex(1, 2)}
    assert roundtrip("pickle", obj) == obj


@pytest.mark.parametrize("name", ["msgpack", "json", "pickle"])
def test_frames_accept_other_buffers(name):
    c = get_codec(name)
    frames = [bytearray(f) for f in c.dumps(NESTED)]
    assert c.loads(frames) == NESTED
    frames = [memoryview(bytes(f)) for f in c.dumps(NESTED)]
    assert c.loads(frames) == NESTED


# ---- msgpack ------------------------------------------------------------------

def test_msgpack_bytes_stay_bytes():
    data = {"b": b"\x00\x01\xff" * 100, "ba": bytearray(b"xy"), "s": "text"}
    frames = get_codec("msgpack").dumps(data)
    assert b"\x00\x01\xff" * 100 in bytes(frames[0])  # raw bin, not base64
    out = roundtrip("msgpack", data)
    assert out == {"b": b"\x00\x01\xff" * 100, "ba": b"xy", "s": "text"}
    assert type(out["b"]) is bytes and type(out["s"]) is str


def test_msgpack_non_str_keys():
    assert roundtrip("msgpack", {1: "a", b"k": "b", None: 2}) == {1: "a", b"k": "b", None: 2}


def test_msgpack_is_plain_msgpack():
    frames = get_codec("msgpack").dumps([1, "a", b"b"])
    assert msgpack.unpackb(frames[0], raw=False) == [1, "a", b"b"]


def test_msgpack_refuses_unknown_type():
    with pytest.raises(TypeError, match="set"):
        get_codec("msgpack").dumps({1, 2})


@pytest.mark.parametrize("dtype", ["<f8", ">f8", "<i4", ">i2", "u1", "?", "<c16", "<f2",
                                   "<U3", "S4", "<M8[ns]", "<m8[s]", "V3"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 3, 4), (1, 0, 2)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_msgpack_numpy_roundtrip(dtype, shape, order):
    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    raw = rng.integers(0, 256, n * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype in ("<f8", ">f8", "<c16", "<f2"):
        src = rng.standard_normal(n).astype(dtype)
    elif dtype == "<U3":
        src = np.array([f"a{i % 99}" for i in range(n)], dtype=dtype)
    else:
        src = raw.view(dtype)
    arr = np.asarray(src.reshape(shape), order=order)
    arr = np.array(arr, order=order)
    out = roundtrip("msgpack", {"a": arr})["a"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes(order="A") == arr.tobytes(order="A")
    if arr.dtype.kind != "V":
        assert np.array_equal(out, arr, equal_nan=arr.dtype.kind in "fc")
    if order == "F" and arr.ndim > 1 and arr.size:
        assert out.flags.f_contiguous
    assert out.flags.writeable is False


def test_msgpack_numpy_noncontiguous_and_aligned():
    base = np.arange(100, dtype=np.float64).reshape(10, 10)
    view = base[::2, 1::3]
    out = roundtrip("msgpack", view)
    assert np.array_equal(out, view) and out.flags.c_contiguous
    assert out.flags.aligned


def test_msgpack_numpy_structured():
    dt = np.dtype([("a", "<i4"), ("b", "<f8", (2, 3)), ("c", [("x", "u1"), ("y", "S2")])])
    arr = np.zeros(4, dt)
    arr["a"] = [1, 2, 3, 4]
    arr["b"][1] = 7.5
    arr["c"]["y"][2] = b"hi"
    out = roundtrip("msgpack", arr)
    assert out.dtype == dt and out.tobytes() == arr.tobytes()


def test_msgpack_numpy_scalars():
    for s in (np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(200), np.complex64(1 + 2j)):
        out = roundtrip("msgpack", [s])[0]
        assert type(out) is type(s) and out == s


def test_msgpack_numpy_object_refused():
    with pytest.raises(TypeError, match="object"):
        get_codec("msgpack").dumps(np.array([1, "x"], dtype=object))


def test_msgpack_numpy_object_payload_refused():
    # a hand-made payload naming an object dtype must not be decoded
    d = b"|O"
    payload = codecs._HDR.pack(1, 0, 1, len(d)) + (1).to_bytes(8, "little") + d
    payload += b"\0" * (-len(payload) % 16) + b"\0" * 8
    data = msgpack.packb(msgpack.ExtType(codecs.NUMPY_EXT_CODE, payload))
    with pytest.raises(TypeError):
        get_codec("msgpack").loads([data])


def test_msgpack_numpy_bad_size_refused():
    good = get_codec("msgpack").dumps(np.arange(4, dtype="<i4"))[0]
    ext = msgpack.unpackb(good, ext_hook=lambda c, d: d)
    bad = msgpack.packb(msgpack.ExtType(codecs.NUMPY_EXT_CODE, ext[:-1]))
    with pytest.raises(ValueError):
        get_codec("msgpack").loads([bad])


def test_msgpack_other_ext_passthrough():
    data = msgpack.packb(msgpack.ExtType(5, b"abc"))
    assert get_codec("msgpack").loads([data]) == msgpack.ExtType(5, b"abc")


# ---- json ---------------------------------------------------------------------

def test_json_is_utf8_json():
    (frame,) = get_codec("json").dumps({"s": "h\u00e9\u2603", "n": [1, 2.5, None]})
    assert isinstance(frame, bytes)
    assert json.loads(frame.decode("utf-8")) == {"s": "h\u00e9\u2603", "n": [1, 2.5, None]}
    assert get_codec("json").loads(['{"a":"\u00e9"}'.encode("utf-8")]) == {"a": "\u00e9"}


def test_json_lone_surrogate_roundtrip():
    assert roundtrip("json", "\ud800x") == "\ud800x"


@pytest.mark.parametrize("value", [b"abc", bytearray(b"abc"), memoryview(b"abc")])
def test_json_refuses_bytes(value):
    with pytest.raises(TypeError) as ei:
        get_codec("json").dumps({"x": [value]})
    msg = str(ei.value)
    assert type(value).__name__ in msg and "use msgpack or pickle for bytes" in msg


class Custom:
    pass


@pytest.mark.parametrize("value,tname", [({1, 2}, "set"), (Custom(), "Custom"),
                                         (complex(1, 2), "complex"), (object(), "object")])
def test_json_refuses_naming_type(value, tname):
    with pytest.raises(TypeError, match=tname):
        get_codec("json").dumps([value])


def test_json_refuses_numpy():
    with pytest.raises(TypeError, match="ndarray"):
        get_codec("json").dumps(np.zeros(3))


# ---- pickle -------------------------------------------------------------------

def addr(buf):
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


def test_pickle_array_out_of_band():
    arr = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    assert arr.nbytes == 1 << 20
    msg = [0, 1, "f", [arr], {}]
    frames = get_codec("pickle").dumps(msg)
    assert len(frames) == 2
    assert len(frames[0]) < 1024  # the data is not in the pickle
    assert memoryview(frames[1]).nbytes == arr.nbytes
    assert addr(frames[1]) == arr.__array_interface__["data"][0]
    out = get_codec("pickle").loads(frames)
    assert np.array_equal(out[3][0], arr)
    # received frames as their own bytes objects: the array is a view over them
    recv = [bytes(f) for f in frames]
    out = get_codec("pickle").loads(recv)
    assert np.array_equal(out[3][0], arr)
    assert out[3][0].__array_interface__["data"][0] == addr(recv[1])


def test_pickle_fortran_array_out_of_band():
    arr = np.asfortranarray(np.arange(300 * 400, dtype=np.int32).reshape(300, 400))
    frames = get_codec("pickle").dumps(arr)
    assert len(frames) == 2 and addr(frames[1]) == arr.__array_interface__["data"][0]
    out = get_codec("pickle").loads([bytes(f) for f in frames])
    assert np.array_equal(out, arr) and out.flags.f_contiguous


def test_pickle_several_buffers_in_order():
    a = np.ones(1 << 16, dtype=np.float64)
    b = np.full(1 << 15, 7, dtype=np.int64)
    big = b"z" * (1 << 17)
    ba = bytearray(b"q" * (1 << 17))
    obj = {"a": a, "b": b, "big": big, "ba": ba, "small": b"s" * 10}
    frames = get_codec("pickle").dumps(obj)
    assert len(frames) == 3  # the arrays out of band; bytes and bytearray stay in the pickle
    assert addr(frames[1]) == a.ctypes.data and addr(frames[2]) == b.ctypes.data
    out = get_codec("pickle").loads([bytes(f) for f in frames])
    assert np.array_equal(out["a"], a) and np.array_equal(out["b"], b)
    assert out["big"] == big and type(out["big"]) is bytes
    assert out["ba"] == ba and type(out["ba"]) is bytearray
    assert out["small"] == b"s" * 10


def test_pickle_large_bytes_travel_in_band():
    big = b"x" * (1 << 20)
    frames = get_codec("pickle").dumps([big])
    assert len(frames) == 1 and len(frames[0]) > len(big)
    assert get_codec("pickle").loads([bytes(frames[0])]) == [big]


def test_pickle_small_in_band():
    small = np.arange(10)
    frames = get_codec("pickle").dumps([small, b"y" * 100, bytearray(100)])
    assert len(frames) == 1
    out = get_codec("pickle").loads(frames)
    assert np.array_equal(out[0], small) and out[1:] == [b"y" * 100, bytearray(100)]


def test_pickle_noncontiguous_array():
    # numpy pickles it through one contiguous bytes copy, inside the pickle
    strided = np.arange(1 << 18, dtype=np.float64)[::2]  # 1 MiB, not contiguous
    frames = get_codec("pickle").dumps([strided])
    assert len(frames) == 1
    out = get_codec("pickle").loads([bytes(f) for f in frames])
    assert np.array_equal(out[0], strided)


def test_pickle_same_bytes_twice_pickled_once():
    big = b"w" * (1 << 17)
    frames = get_codec("pickle").dumps([big, big, (big,)])
    assert len(frames) == 1 and len(frames[0]) < 2 * len(big)
    out = get_codec("pickle").loads(frames)
    assert out == [big, big, (big,)]
    assert out[0] is out[1] is out[2][0]


def test_pickle_plain_frame_is_standard_pickle():
    frames = get_codec("pickle").dumps({"a": (1, 2)})
    assert pickle.loads(frames[0]) == {"a": (1, 2)}


def test_pickle_missing_buffers_fails():
    frames = get_codec("pickle").dumps(np.zeros(1 << 17))
    with pytest.raises(pickle.UnpicklingError):
        get_codec("pickle").loads(frames[:1])
    with pytest.raises(ValueError):
        get_codec("pickle").loads([])
