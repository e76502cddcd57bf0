"""inpaint(), value-range helpers and checkpoints."""

import io

import numpy as np
import pytest
import torch

from models import InpaintGenerator, checkpoint, for_inference, inpaint, inpaint_uint8, to_model_range, to_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return InpaintGenerator(cnum=8)


def _inputs(B, H, W):
    g = torch.Generator().manual_seed(H * 1000 + W)
    image = torch.rand(B, 3, H, W, generator=g) * 2 - 1
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, H // 3:H // 2, W // 4:W // 2] = 1
    mask[-1, :, 2:6, W - 9:W - 3] = 1
    return image, mask


@pytest.mark.parametrize("H,W", [(64, 64), (37, 51), (70, 29), (5, 7)])
def test_inpaint_any_size_keeps_known_pixels(gen, H, W):
    image, mask = _inputs(2, H, W)
    out = inpaint(gen, image, mask)
    assert out.shape == image.shape and out.dtype == image.dtype
    known = (mask == 0).expand_as(image)
    assert torch.equal(out[known], image[known])  # bit-identical
    assert not torch.equal(out[~known], image[~known])  # holes were filled
    assert out.abs().max() <= 1 and not out.requires_grad


def test_inpaint_matches_generator_composite_and_restores_state(gen):
    image, mask = _inputs(2, 64, 48)
    gen.train()
    budget = gen.attention.max_score_bytes
    out, offsets = inpaint(gen, image, mask, return_offsets=True, max_score_bytes=4096)
    assert gen.training and gen.attention.max_score_bytes == budget
    with torch.no_grad():
        _, refined, off_ref = gen(image, mask)
    expected = refined * mask + image * (1 - mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # chunked attention inside inpaint
    assert torch.equal(offsets, off_ref) and offsets.shape == (2, 2, 8, 6)


def test_for_inference_is_channels_last_and_gives_the_same_composite(gen):
    image, mask = _inputs(2, 64, 48)
    expected, off_ref = inpaint(gen, image, mask, return_offsets=True)
    fast = InpaintGenerator(cnum=8)
    fast.load_state_dict(gen.state_dict())
    fast.train()
    assert for_inference(fast) is fast and not fast.training
    conv = fast.coarse[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out, offsets = inpaint(fast, image, mask, return_offsets=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(offsets, off_ref)
    known = (mask == 0).expand_as(image)
    assert torch.equal(out[known], image[known])


def test_load_for_inference_from_a_path_a_file_or_bytes(gen, tmp_path):
    path = tmp_path / "generator.pt"
    checkpoint.save_generator(str(path), gen, step=5)
    with open(path, "rb") as f:
        sources = (str(path), f, path.read_bytes())
        for source in sources:
            loaded, meta = checkpoint.load_for_inference(source, device="cpu")
            assert meta["step"] == 5 and not loaded.training
            assert loaded.coarse[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), loaded.state_dict().values()))


def _uint8_inputs(N, H, W, hole=1):
    rng = np.random.default_rng(H * 1000 + W)
    image = rng.integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)
    mask = np.zeros((N, H, W, 1), np.uint8)
    mask[0, H // 4:H // 2, W // 3:W // 2] = hole
    mask[-1, 1:5, W - 8:W - 2] = hole
    return image, mask


@pytest.mark.parametrize("H,W", [(64, 48), (37, 29)])
def test_inpaint_uint8_keeps_known_pixels_exactly(gen, H, W):
    image, mask = _uint8_inputs(2, H, W)
    out = inpaint_uint8(gen, image, mask)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, H, W, 3)
    known = mask[..., 0] == 0
    assert np.array_equal(out[known], image[known])  # exactly the input
    assert not np.array_equal(out[~known], image[~known])  # holes were filled
    # the same composite as inpaint() on the model range, rounded to uint8
    x = to_model_range(image)
    m = torch.from_numpy(mask).permute(0, 3, 1, 2).float()
    expected = to_uint8(inpaint(gen, x, m)).numpy()
    assert np.array_equal(out[~known], expected[~known])


def test_inpaint_uint8_mask_shapes_values_and_offsets(gen):
    image, mask = _uint8_inputs(2, 32, 40)
    out = inpaint_uint8(gen, image, mask)
    assert np.array_equal(inpaint_uint8(gen, image, mask[..., 0]), out)  # (N, H, W) masks too
    _, mask255 = _uint8_inputs(2, 32, 40, hole=255)
    assert np.array_equal(inpaint_uint8(gen, image, mask255), out)  # nonzero = hole
    filled, offsets = inpaint_uint8(gen, image, mask, return_offsets=True)
    assert np.array_equal(filled, out)
    assert isinstance(offsets, torch.Tensor) and offsets.shape == (2, 2, 4, 5) and offsets.dtype == torch.int64


def test_inpaint_uint8_rejects_bad_shapes_and_dtypes(gen):
    image, mask = _uint8_inputs(2, 16, 16)
    with pytest.raises(ValueError, match=r"image must be uint8 \(N, H, W, 3\)"):
        inpaint_uint8(gen, image.astype(np.float32), mask)
    with pytest.raises(ValueError, match=r"image must be uint8 \(N, H, W, 3\)"):
        inpaint_uint8(gen, image[0], mask[0])
    with pytest.raises(ValueError, match=r"image must be uint8 \(N, H, W, 3\)"):
        inpaint_uint8(gen, image[..., :1], mask)
    with pytest.raises(ValueError, match=r"mask must be \(N, H, W, 1\) matching image"):
        inpaint_uint8(gen, image, mask[:, :-1])
    with pytest.raises(ValueError, match=r"mask must be \(N, H, W, 1\) matching image"):
        inpaint_uint8(gen, image, np.repeat(mask, 3, axis=-1))
    with pytest.raises(ValueError, match=r"mask must be \(N, H, W, 1\) matching image"):
        inpaint_uint8(gen, image, mask[:1])


def test_value_range_helpers_round_trip():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    x = to_model_range(u8)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert to_model_range(u8)[0, :, 0, 0].tolist() == pytest.approx((u8[0, 0, 0] / 127.5 - 1).tolist(), abs=1e-6)
    back = to_uint8(x)
    assert back.dtype == torch.uint8 and back.shape == (2, 5, 7, 3)
    assert np.array_equal(back.numpy(), u8)
    assert torch.equal(to_model_range(torch.from_numpy(u8)), x)
    assert to_uint8(torch.tensor([[[[-3.0, 3.0]]]])).flatten().tolist() == [0, 255]


@pytest.mark.parametrize("use_file_object", [False, True])
def test_checkpoint_round_trip(gen, tmp_path, use_file_object):
    config = {"model": {"cnum": 8}, "optim": {"lr": 1e-4, "betas": [0.5, 0.9]}, "name": "tiny", "none": None}
    if use_file_object:
        buf = io.BytesIO()
        checkpoint.save_generator(buf, gen, step=7, config=config, extra={"epoch": 2})
        buf.seek(0)
        raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        loaded, meta = checkpoint.load_generator(buf)
    else:
        path = tmp_path / "gen.pt"
        checkpoint.save_generator(path, gen, step=7, config=config, extra={"epoch": 2})
        raw = torch.load(path, weights_only=True)
        loaded, meta = checkpoint.load_generator(str(path))
    assert raw["format"] == "deepfill-ray/generator/1" and raw["model"] == {"cnum": 8} and raw["step"] == 7
    assert meta["step"] == 7 and meta["config"] == config and meta["extra"] == {"epoch": 2}
    assert loaded.cnum == 8
    for (k, v), (k2, v2) in zip(gen.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    image, mask = _inputs(1, 32, 32)
    assert torch.equal(inpaint(gen, image, mask), inpaint(loaded, image, mask))


def test_checkpoint_rejects_foreign_files_and_non_plain_config(gen, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something/else", "weights": {}}, path)
    with pytest.raises(ValueError, match="not a deepfill-ray/generator/1 checkpoint"):
        checkpoint.load_generator(path)
    with pytest.raises(ValueError, match="config.path"):
        checkpoint.save_generator(tmp_path / "x.pt", gen, config={"path": tmp_path})
