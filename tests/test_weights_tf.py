"""The TF release's checkpoints without TensorFlow: models.tf_bundle (the tensor bundle reader),
models.weights_tf (names and layouts) and the "tf" semantics (padding, align-corners resizes), checked against
what TensorFlow itself wrote and computed (tests/fixtures/tf_release, made by its make_fixture.py).

Tolerances: our coarse network and critics under semantics "tf" against TF's float32 outputs: max abs 1e-4
(measured 3.1e-6 for the coarse network, 4e-7 for the critics); the resizes: exact.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import checkpoint, tf_bundle, weights_tf
from models.attention import _downsample
from models.critics import global_critic, local_critic
from models.generator import InpaintGenerator
from models.layers import resize_nearest_tf, set_semantics, tf_same_padding

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tf_release"
PREFIX = str(FIXTURE / "snap")
DATA = FIXTURE / "snap.data-00000-of-00001"
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny inputs: one thread beats two on a shared machine


@pytest.fixture(scope="module")
def converted():
    return weights_tf.convert_tf(str(FIXTURE))


@pytest.fixture(scope="module")
def tf_generator(converted):
    g = InpaintGenerator(cnum=32, semantics="tf").eval()
    g.load_state_dict(converted["generator"])
    return g


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- tf_bundle

def test_listing_matches_what_tensorflow_listed():
    tf_list = json.loads((FIXTURE / "tf_variables.json").read_text())
    ours = tf_bundle.list_bundle(PREFIX)
    assert list(ours) == [name for name, _, _ in tf_list]  # same names, sorted
    for name, shape, dtype in tf_list:
        assert ours[name] == (np.dtype(dtype), tuple(shape)), name
    assert len(ours) == 111 and ours["global_step"] == (np.dtype("int64"), ())


def test_read_bundle_values_and_crc():
    values = tf_bundle.read_bundle(FIXTURE)  # the folder: its checkpoint file names snap
    assert set(values) == set(tf_bundle.list_bundle(PREFIX))
    assert values["global_step"] == 123456 and values["beta1_power"] == np.float32(0.5)
    k = values["inpaint_net/conv1/kernel"]
    assert k.shape == (5, 5, 5, 32) and k.dtype == np.float32 and k.flags.writeable
    assert np.all(k * 64 == np.round(k * 64)) and np.abs(k).max() <= 0.25 and np.count_nonzero(k) > 1000
    some = tf_bundle.read_bundle(PREFIX, names=["inpaint_net/conv1/bias"])
    assert list(some) == ["inpaint_net/conv1/bias"]
    np.testing.assert_array_equal(some["inpaint_net/conv1/bias"], values["inpaint_net/conv1/bias"])
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        tf_bundle.read_bundle(PREFIX, names=["nope"])


def test_crc32c():
    assert tf_bundle.crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    rng = np.random.default_rng(0)
    for n in (0, 1, 4 * tf_bundle._LANES - 1, 4 * tf_bundle._LANES, 3 * tf_bundle._LANES * 8 + 5):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tf_bundle.crc32c(data) == tf_bundle._crc_update_scalar(0xFFFFFFFF, data) ^ 0xFFFFFFFF, n
    assert tf_bundle._unmask(tf_bundle._mask(0x12345678)) == 0x12345678


def test_resolve_prefix_and_looks_like_tf(tmp_path):
    for path in (PREFIX, PREFIX + ".index", str(DATA), str(FIXTURE)):
        assert tf_bundle.resolve_prefix(path) == PREFIX
        assert weights_tf.looks_like_tf(path), path
    (tmp_path / "generator.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp_path / "bad.index").write_bytes(b"\0" * 100)  # no SSTable magic
    for path in (tmp_path / "generator.pt", tmp_path / "nothing", tmp_path / "bad", tmp_path / "bad.index"):
        assert not weights_tf.looks_like_tf(path), path
    assert weights_tf.looks_like_tf(tmp_path) is False  # a folder with one .index that is not a table
    with pytest.raises(FileNotFoundError, match="nothing"):
        tf_bundle.resolve_prefix(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- conversion

def test_convert_uses_or_ignores_every_tensor_and_fills_every_parameter(converted):
    listing = tf_bundle.list_bundle(PREFIX)
    used = set(converted["names"].values())
    assert used.isdisjoint(converted["ignored"]) and used | set(converted["ignored"]) == set(listing)
    assert converted["ignored"] == sorted(converted["ignored"]) == [
        "beta1_power", "beta2_power", "discriminator/dout_local_fc/bias/Adam",
        "discriminator/dout_local_fc/bias/Adam_1", "global_step", "inpaint_net/conv1/kernel/Adam",
        "inpaint_net/conv1/kernel/Adam_1"]
    assert (converted["format"], converted["semantics"], converted["cnum"]) == ("tf", "tf", 32)
    g = InpaintGenerator(cnum=32)
    assert set(converted["generator"]) == set(g.state_dict())
    g.load_state_dict(converted["generator"])  # strict
    assert all(t.dtype == torch.float32 for t in converted["generator"].values())
    assert converted["critics_meta"] == {"cnum": 64, "local_size": 128, "global_size": 256}
    local_critic(64, 128).load_state_dict(converted["critics"]["local"])
    global_critic(64, 256).load_state_dict(converted["critics"]["global"])
    # the names: both kinds of gen_conv / gen_deconv scope, each branch; HWIO -> OIHW
    names = converted["names"]
    assert names["coarse.12.conv.conv.weight"] == "inpaint_net/conv13_upsample/conv13_upsample_conv/kernel"
    assert names["refine_attn_out.0.conv.bias"] == "inpaint_net/pmconv9/bias"
    assert names["refine_dec.4.conv.conv.weight"] == "inpaint_net/allconv15_upsample/allconv15_upsample_conv/kernel"
    assert names["global_critic.linear.weight"] == "discriminator/dout_global_fc/kernel"
    src = tf_bundle.read_bundle(PREFIX, names=["inpaint_net/xconv4_downsample/kernel"])
    np.testing.assert_array_equal(converted["generator"]["refine_conv.3.conv.weight"].numpy(),
                                  src["inpaint_net/xconv4_downsample/kernel"].transpose(3, 2, 0, 1))


def test_coarse_network_matches_tensorflow(tf_generator):
    """TF's stage 1 (stride-2 'SAME', dilations, align-corners x2 upsampling, ELU) on two inputs (the second
    has odd sizes at 1/4) against ours under "tf"; "torch" padding gives another output."""
    fx = np.load(FIXTURE / "coarse.npz")
    for i in range(2):
        image = _nchw(fx[f"image8_{i}"].astype(np.float32) / 8)
        mask = _nchw(fx[f"mask{i}"].astype(np.float32))
        x = torch.cat([image * (1 - mask), torch.ones_like(mask), mask], 1)  # the release's input
        want = _nchw(fx[f"raw{i}"])
        with torch.no_grad():
            got = tf_generator.coarse(x)
            assert (got - want).abs().max().item() < TOL, i
            assert ((got.clamp(-1, 1) - want.clamp(-1, 1)).abs().max().item()) < TOL
            set_semantics(tf_generator, "torch")
            try:
                assert (tf_generator.coarse(x) - want).abs().max().item() > 0.5, i  # the switch matters
            finally:
                set_semantics(tf_generator, "tf")


def test_critics_match_tensorflow(converted):
    fx = np.load(FIXTURE / "critics.npz")
    meta = converted["critics_meta"]
    for side, factory in (("local", local_critic), ("global", global_critic)):
        critic = factory(64, meta[f"{side}_size"])
        critic.load_state_dict(converted["critics"][side])
        x = _nchw(fx[f"{side}_in8"].astype(np.float32) / 8)
        want = torch.from_numpy(fx[f"{side}_out"])
        with torch.no_grad():
            assert (set_semantics(critic, "tf")(x) - want).abs().max().item() < TOL, side
            assert (set_semantics(critic, "torch")(x) - want).abs().max().item() > 0.05, side


def test_resize_matches_tensorflow_op():
    fx = np.load(FIXTURE / "resize.npz")
    assert len(fx.files) == 11
    for key in fx.files:
        (h, w), (oh, ow) = [tuple(int(v) for v in s.split("x")) for s in key.split("_to_")]
        x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
        got = resize_nearest_tf(x, (oh, ow))[0, 0].to(torch.int32).numpy()
        np.testing.assert_array_equal(got, fx[key], err_msg=key)
        if (oh, ow) == (2 * h, 2 * w):  # x2: the same pixels as F.interpolate, so GenDeconv needs no switch
            assert torch.equal(resize_nearest_tf(x, (oh, ow)), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert list(fx["64x64_to_32x32"][0, 14:18]) == [28, 30, 33, 35]  # round(i * 63 / 31), not 2i


def test_tf_same_padding():
    assert tf_same_padding(64, 3, 2, 1) == (0, 1) and tf_same_padding(64, 5, 2, 1) == (1, 2)
    assert tf_same_padding(11, 3, 2, 1) == (1, 1) and tf_same_padding(16, 3, 1, 16) == (16, 16)


def test_tf_semantics_in_the_attention_and_the_generator():
    torch.manual_seed(0)
    f = torch.randn(2, 4, 16, 12)
    mask = torch.zeros(2, 1, 16, 12)
    mask[:, :, 5:11, 3:8] = 1
    fd, bd, md = _downsample("tf", f, f, mask, 2)
    assert torch.equal(fd, resize_nearest_tf(f, (8, 6))) and torch.equal(md, resize_nearest_tf(mask, (8, 6)))
    assert not torch.equal(fd, f[:, :, ::2, ::2])
    fd0, _, md0 = _downsample("torch", f, f, mask, 2)
    assert torch.equal(fd0, f[:, :, ::2, ::2]) and torch.equal(md0, F.max_pool2d(mask, 2))

    g = InpaintGenerator(cnum=4, semantics="tf").eval()
    assert {m.semantics for m in g.modules() if hasattr(m, "semantics")} == {"tf"}
    image = torch.rand(2, 3, 48, 40) * 2 - 1
    hole = torch.zeros(2, 1, 48, 40)
    hole[0, :, 20:28, 8:30] = 1
    hole[1, :, 4:12, 20:36] = 1
    with torch.no_grad():
        _, refined, offsets = g(image, hole)
        _, refined_h, _ = g(image, hole, holes_only=True)  # the inference shortcut holds under "tf" too
        torch.testing.assert_close(refined_h * hole, refined * hole, rtol=0, atol=1e-5)
        set_semantics(g, "torch")
        _, refined_t, _ = g(image, hole)
    assert refined.shape == (2, 3, 48, 40) and offsets.shape == (2, 2, 6, 5)
    assert not torch.allclose(refined_t, refined, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_keeps_the_semantics(converted, tf_generator, tmp_path):
    g = InpaintGenerator(cnum=32)  # built with the default, holding converted weights: say "tf" on save
    g.load_state_dict(converted["generator"])
    path = tmp_path / "generator.pt"
    checkpoint.save_generator(str(path), g, step=3, semantics="tf")
    raw = torch.load(path, weights_only=True)
    assert raw["model"] == {"cnum": 32, "semantics": "tf"}
    for loaded, meta in (checkpoint.load_generator(str(path)), checkpoint.load_for_inference(path.read_bytes(),
                                                                                             device="cpu")):
        assert meta["model"]["semantics"] == "tf" and meta["step"] == 3
        assert {m.semantics for m in loaded.modules() if hasattr(m, "semantics")} == {"tf"}
        x = torch.rand(1, 5, 16, 24)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().coarse(x), tf_generator.coarse(x), rtol=0, atol=1e-5)
    # saving a "tf" generator records its own setting; "torch" files are as before (no key) and load as torch
    checkpoint.save_generator(str(path), tf_generator)
    assert torch.load(path, weights_only=True)["model"]["semantics"] == "tf"
    checkpoint.save_generator(str(path), InpaintGenerator(cnum=4))
    assert torch.load(path, weights_only=True)["model"] == {"cnum": 4}
    loaded, meta = checkpoint.load_generator(str(path))
    assert loaded.semantics == "torch" and meta["model"]["semantics"] == "torch"
    state = checkpoint.generator_state(InpaintGenerator(cnum=4))
    state["model"]["semantics"] = "jax"
    with pytest.raises(ValueError, match="unknown semantics 'jax'"):
        checkpoint.generator_from_state(state)


# ---------------------------------------------------------------------------------------------- errors

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _entry(dtype: int, shape, offset: int, size: int, crc: int) -> bytes:
    """A BundleEntryProto."""
    dims = b"".join(_field(2, _varint(1 << 3) + _varint(d)) for d in shape)
    return (_varint(1 << 3) + _varint(dtype) + _field(2, dims) + _varint(4 << 3) + _varint(offset)
            + _varint(5 << 3) + _varint(size) + _varint(6 << 3 | 5) + struct.pack("<I", crc))


def _write_table(path: Path, pairs, block_type: int = 0) -> None:
    """A minimal LevelDB-format table: one data block (a restart at every entry), an empty metaindex block,
    an index block, the footer."""
    def block(entries):
        body = bytearray()
        restarts = []
        for key, value in entries:
            restarts.append(len(body))
            body += _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value
        body += b"".join(struct.pack("<I", r) for r in restarts or [0]) + struct.pack("<I", len(restarts) or 1)
        return bytes(body)

    out = bytearray()

    def put(contents, kind=0):
        off = len(out)
        out.extend(contents + bytes([kind]))
        out.extend(struct.pack("<I", tf_bundle._mask(tf_bundle.crc32c(contents + bytes([kind])))))
        return _varint(off) + _varint(len(contents))

    data_handle = put(block(pairs), block_type)
    meta_handle = put(block([]))
    index_handle = put(block([(pairs[-1][0], data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", tf_bundle.TABLE_MAGIC)
    path.write_bytes(bytes(out) + footer)


def _rewrite(tmp_path: Path, change=None, extra=(), block_type: int = 0) -> str:
    """The fixture's index rewritten by _write_table (entries through change(name, entry) -> entry or None
    to drop it, plus `extra` (name, entry) pairs), beside a link to the fixture's data file."""
    header, entries = tf_bundle._read_index(PREFIX + ".index")
    codes = {np.dtype("float32"): 1, np.dtype("int64"): 9}
    pairs = [(b"", _varint(1 << 3) + _varint(1) + _field(3, _varint(1 << 3) + _varint(1)))]
    items = dict(entries)
    items.update(dict(extra))
    for name in sorted(items):
        e = dict(items[name])
        if change is not None and name in entries:
            e = change(name, e)
            if e is None:
                continue
        pairs.append((name.encode(), _entry(codes[np.dtype(e["dtype"])], e["shape"], e["offset"], e["size"],
                                            e["crc32c"])))
    _write_table(tmp_path / "snap.index", pairs, block_type)
    (tmp_path / DATA.name).symlink_to(DATA)
    return str(tmp_path / "snap")


def test_rewritten_index_reads_the_same(tmp_path):
    prefix = _rewrite(tmp_path)  # our own writer: checks the reader on another block layout
    assert tf_bundle.list_bundle(prefix) == tf_bundle.list_bundle(PREFIX)


def test_truncated_index(tmp_path):
    data = (FIXTURE / "snap.index").read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 10):
        (tmp_path / "snap.index").write_bytes(data[:cut])
        with pytest.raises(tf_bundle.BundleError, match=r"snap\.index.*truncated"):
            tf_bundle.list_bundle(tmp_path / "snap")
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF
    (tmp_path / "snap.index").write_bytes(bytes(corrupt))
    with pytest.raises(tf_bundle.BundleError, match="crc32c mismatch"):
        tf_bundle.list_bundle(tmp_path / "snap")


def test_missing_data_file(tmp_path):
    shutil.copy(FIXTURE / "snap.index", tmp_path / "snap.index")
    assert tf_bundle.list_bundle(tmp_path / "snap")  # the index alone lists
    with pytest.raises(FileNotFoundError, match=r"snap\.data-00000-of-00001: data file missing"):
        weights_tf.convert_tf(str(tmp_path / "snap"))


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    key = "inpaint_net/xconv3/kernel"  # (3, 3, 32, 64): declare (3, 3, 64, 32), same bytes

    def swap(name, e):
        return {**e, "shape": (3, 3, 64, 32)} if name == key else e

    with pytest.raises(ValueError, match=r"inpaint_net/xconv3/kernel has shape \[3, 3, 64, 32\], which does "
                                         r"not fit refine_conv\.2\.conv\.weight \[64, 32, 3, 3\]"):
        weights_tf.convert_tf(_rewrite(tmp_path, swap))


def test_unexpected_and_missing_tensors(tmp_path):
    bias = dict(tf_bundle._read_index(PREFIX + ".index")[1]["inpaint_net/conv1/bias"])
    with pytest.raises(ValueError, match=r"unexpected tensor inpaint_net/conv18/bias \[32\]"):
        weights_tf.convert_tf(_rewrite(tmp_path / "a", extra=[("inpaint_net/conv18/bias", bias)]))
    with pytest.raises(ValueError, match="missing tensor discriminator/dout_global_fc/bias"):
        weights_tf.convert_tf(_rewrite(tmp_path / "b", lambda n, e: None if n == "discriminator/dout_global_fc/bias"
                                       else e))
    # no discriminator at all (the released Places2 file): critics None
    result = weights_tf.convert_tf(_rewrite(tmp_path / "c", lambda n, e: None if n.startswith("discriminator/")
                                            else e))
    assert result["critics"] is None and result["critics_meta"] is None and len(result["generator"]) == 84


def test_snappy_block_is_refused(tmp_path):
    with pytest.raises(tf_bundle.BundleError, match="Snappy-compressed"):
        tf_bundle.list_bundle(_rewrite(tmp_path, block_type=1))


@pytest.fixture(autouse=True)
def _subdirs(tmp_path):
    for d in "abc":
        os.makedirs(tmp_path / d, exist_ok=True)
