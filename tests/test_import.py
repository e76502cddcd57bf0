"""deepfill import and models.weights: each released format's exact keys and shapes, converted tensor by
tensor; --format auto; hostile files through the CLI; registration in MLflow and the same pixels back.

The key lists below are written down from each format's own code (not from models.weights):
- the PyTorch port (daa233/generative-inpainting-pytorch, model/networks.py): Generator ->
  coarse_generator / fine_generator, each layer a Conv2dBlock whose nn.Conv2d is ``.conv``; LocalDis /
  GlobalDis -> dis_conv_module.conv1..4.conv + linear; its trainer saves gen_%08d.pt (netG.state_dict())
  and dis_%08d.pt ({"localD": ..., "globalD": ...}); torch_model.p (test_tf_model.py) is loaded into the
  whole Trainer: keys under netG.;
- MMagic (mmagic/models/editors/deepfillv1 + global_local/gl_dilation.py, base_deepfillv1.py): an MMEngine
  checkpoint {"meta", "state_dict"} with generator.stage1/stage2.* (mmcv ConvModule: ``.conv``), the
  attention's fuse_kernel buffer and disc.global_disc / disc.local_disc (MultiLayerDiscriminator:
  conv1..4.conv, fc.linear).
Shapes: the real width (cnum 32, critics 64 at 256 px) for the key-by-key checks; cnum 8 (the port's ngf
and MMagic's channel_factor allow it) where a file goes through the CLI and MLflow, to keep it fast.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

import models
from jobs import cli
from models import weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# (name, in channels, out channels, kernel) as functions of the width c -----------------------------------
def _port_generator_layers(c):
    coarse = [("conv1", 5, c, 5), ("conv2_downsample", c, 2 * c, 3), ("conv3", 2 * c, 2 * c, 3),
              ("conv4_downsample", 2 * c, 4 * c, 3), ("conv5", 4 * c, 4 * c, 3), ("conv6", 4 * c, 4 * c, 3),
              ("conv7_atrous", 4 * c, 4 * c, 3), ("conv8_atrous", 4 * c, 4 * c, 3), ("conv9_atrous", 4 * c, 4 * c, 3),
              ("conv10_atrous", 4 * c, 4 * c, 3), ("conv11", 4 * c, 4 * c, 3), ("conv12", 4 * c, 4 * c, 3),
              ("conv13", 4 * c, 2 * c, 3), ("conv14", 2 * c, 2 * c, 3), ("conv15", 2 * c, c, 3),
              ("conv16", c, c // 2, 3), ("conv17", c // 2, 3, 3)]
    fine = [("conv1", 5, c, 5), ("conv2_downsample", c, c, 3), ("conv3", c, 2 * c, 3),
            ("conv4_downsample", 2 * c, 2 * c, 3), ("conv5", 2 * c, 4 * c, 3), ("conv6", 4 * c, 4 * c, 3),
            ("conv7_atrous", 4 * c, 4 * c, 3), ("conv8_atrous", 4 * c, 4 * c, 3), ("conv9_atrous", 4 * c, 4 * c, 3),
            ("conv10_atrous", 4 * c, 4 * c, 3),
            ("pmconv1", 5, c, 5), ("pmconv2_downsample", c, c, 3), ("pmconv3", c, 2 * c, 3),
            ("pmconv4_downsample", 2 * c, 4 * c, 3), ("pmconv5", 4 * c, 4 * c, 3), ("pmconv6", 4 * c, 4 * c, 3),
            ("pmconv9", 4 * c, 4 * c, 3), ("pmconv10", 4 * c, 4 * c, 3),
            ("allconv11", 8 * c, 4 * c, 3), ("allconv12", 4 * c, 4 * c, 3), ("allconv13", 4 * c, 2 * c, 3),
            ("allconv14", 2 * c, 2 * c, 3), ("allconv15", 2 * c, c, 3), ("allconv16", c, c // 2, 3),
            ("allconv17", c // 2, 3, 3)]
    return [(f"coarse_generator.{n}.conv", *s) for n, *s in coarse] + [(f"fine_generator.{n}.conv", *s) for n, *s in fine]


def _port_critic(d, local):
    """The port's LocalDis (4*ndf last, linear ndf*4*8*8) or GlobalDis (linear ndf*4*16*16)."""
    convs = [("dis_conv_module.conv1.conv", 3, d, 5), ("dis_conv_module.conv2.conv", d, 2 * d, 5),
             ("dis_conv_module.conv3.conv", 2 * d, 4 * d, 5), ("dis_conv_module.conv4.conv", 4 * d, 4 * d, 5)]
    return convs, ("linear", 4 * d * (8 * 8 if local else 16 * 16))


def _mmagic_generator_layers(c):
    enc1 = [(5, c, 5), (c, 2 * c, 3), (2 * c, 2 * c, 3), (2 * c, 4 * c, 3), (4 * c, 4 * c, 3), (4 * c, 4 * c, 3)]
    enc_conv = [(5, c, 5), (c, c, 3), (c, 2 * c, 3), (2 * c, 2 * c, 3), (2 * c, 4 * c, 3), (4 * c, 4 * c, 3)]
    enc_attn = [(5, c, 5), (c, c, 3), (c, 2 * c, 3), (2 * c, 4 * c, 3), (4 * c, 4 * c, 3), (4 * c, 4 * c, 3)]
    dil = [(4 * c, 4 * c, 3)] * 4

    def dec(cin):
        return [(cin, 4 * c, 3), (4 * c, 4 * c, 3), (4 * c, 2 * c, 3), (2 * c, 2 * c, 3), (2 * c, c, 3),
                (c, c // 2, 3), (c // 2, 3, 3)]

    out = [(f"generator.stage1.encoder.enc{i + 1}.conv", *s) for i, s in enumerate(enc1)]
    out += [(f"generator.stage1.dilation_neck.dilation_convs.{i}.conv", *s) for i, s in enumerate(dil)]
    out += [(f"generator.stage1.decoder.dec{i + 1}.conv", *s) for i, s in enumerate(dec(4 * c))]
    # DeepFillRefiner registers encoder_attention, encoder_conv, contextual_attention_neck, dilation_neck, decoder
    attn = [(f"generator.stage2.encoder_attention.enc{i + 1}.conv", *s) for i, s in enumerate(enc_attn)]
    conv = [(f"generator.stage2.encoder_conv.enc{i + 1}.conv", *s) for i, s in enumerate(enc_conv)]
    neck = [(f"generator.stage2.contextual_attention_neck.conv{i}.conv", 4 * c, 4 * c, 3) for i in (1, 2)]
    dil2 = [(f"generator.stage2.dilation_neck.dilation_convs.{i}.conv", *s) for i, s in enumerate(dil)]
    decoder = [(f"generator.stage2.decoder.dec{i + 1}.conv", *s) for i, s in enumerate(dec(8 * c))]
    return out, attn, conv, neck, dil2, decoder


def _mmagic_critic(local):
    """MultiLayerDiscriminator: channels min(64 * 2**i, max_channels), fc.linear from max * cells."""
    top = 512 if local else 256
    chans = [3, 64, 128, 256, top]
    convs = [(f"conv{i + 1}.conv", chans[i], chans[i + 1], 5) for i in range(4)]
    return convs, ("fc.linear", top * (8 * 8 if local else 16 * 16))


# Our side, in the same order (the layer list of models.generator) ------------------------------------------
_OUR_CONVS = ([f"coarse.{i}" for i in range(17)] + [f"refine_conv.{i}" for i in range(10)]
              + [f"refine_attn_in.{i}" for i in range(6)] + ["refine_attn_out.0", "refine_attn_out.1"]
              + [f"refine_dec.{i}" for i in range(7)])
_DECONV = {"coarse.12", "coarse.14", "refine_dec.2", "refine_dec.4"}


def _ours(name):
    return f"{name}.conv.conv" if name in _DECONV else f"{name}.conv"


def _conv_tensors(layers, gen, prefix=""):
    out = {}
    for name, cin, cout, k in layers:
        out[f"{prefix}{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * 0.05
        out[f"{prefix}{name}.bias"] = torch.randn(cout, generator=gen) * 0.05
    return out


def _critic_tensors(spec, gen, prefix):
    convs, (linear, fan_in) = spec
    out = _conv_tensors(convs, gen, prefix)
    out[f"{prefix}{linear}.weight"] = torch.randn(1, fan_in, generator=gen) * 0.01
    out[f"{prefix}{linear}.bias"] = torch.randn(1, generator=gen) * 0.01
    return out


def port_generator(c=32, seed=0):
    return _conv_tensors(_port_generator_layers(c), torch.Generator().manual_seed(seed))


def port_critics(d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"localD": _critic_tensors(_port_critic(d, True), g, ""),
            "globalD": _critic_tensors(_port_critic(d, False), g, "")}


def mmagic_checkpoint(c=32, seed=2, critics=True):
    g = torch.Generator().manual_seed(seed)
    stage1, attn, conv, neck, dil2, decoder = _mmagic_generator_layers(c)
    sd = {}
    for part in (stage1, attn, conv):
        sd.update(_conv_tensors(part, g))
    sd["generator.stage2.contextual_attention_neck.contextual_attention.fuse_kernel"] = torch.eye(3).view(1, 1, 3, 3)
    for part in (neck, dil2, decoder):
        sd.update(_conv_tensors(part, g))
    if critics:
        sd.update(_critic_tensors(_mmagic_critic(False), g, "disc.global_disc."))
        sd.update(_critic_tensors(_mmagic_critic(True), g, "disc.local_disc."))
    return {"meta": {"mmedit_version": "0.4.0", "iter": 5000000, "config": "model = dict(...)"}, "state_dict": sd}


def _generator_pairs(source_layers):
    """(our key, source key) for each weight and bias, by position."""
    names = [n for n, *_ in source_layers]
    assert len(names) == len(_OUR_CONVS) == 42
    return [(f"{_ours(o)}.{p}", f"{s}.{p}") for o, s in zip(_OUR_CONVS, names) for p in ("weight", "bias")]


def _assert_same(ours: dict, source: dict, pairs):
    assert len(ours) == len(pairs)
    for our_key, src_key in pairs:
        assert torch.equal(ours[our_key], source[src_key]), (our_key, src_key)


# ----------------------------------------------------------------------------------------- conversion

def test_port_generator_and_critics_convert_tensor_by_tensor(tmp_path):
    gen, dis = port_generator(), port_critics()
    torch.save(gen, tmp_path / "gen_00430000.pt")
    torch.save(dis, tmp_path / "dis_00430000.pt")
    result = weights.convert(str(tmp_path / "gen_00430000.pt"), critics=str(tmp_path / "dis_00430000.pt"))
    assert (result["format"], result["cnum"], result["semantics"]) == ("port", 32, "torch")
    pairs = _generator_pairs(_port_generator_layers(32))
    _assert_same(result["generator"], gen, pairs)
    assert dict(pairs) == {k: v for k, v in result["names"].items() if not k.startswith(("local_", "global_"))}
    # the global critic is ours; the port's local critic (4*ndf last) is not, and is ignored by a named rule
    glob = result["critics"]["global"]
    assert result["critics"]["local"] is None and result["critics_meta"] == {"cnum": 64, "local_size": 128,
                                                                             "global_size": 256}
    for i in range(4):
        assert torch.equal(glob[f"features.{i}.conv.weight"], dis["globalD"][f"dis_conv_module.conv{i + 1}.conv.weight"])
    assert torch.equal(glob["linear.weight"], dis["globalD"]["linear.weight"])
    assert all(k.startswith("localD.") and "4*ndf" in why for k, why in result["ignored"].items())
    assert len(result["ignored"]) == len(dis["localD"])
    models.global_critic(64, 256).load_state_dict(glob)
    models.InpaintGenerator(32).load_state_dict(result["generator"])


def test_port_torch_model_p_and_mmagic_convert_tensor_by_tensor(tmp_path):
    gen = port_generator(seed=3)
    torch.save({f"netG.{k}": v for k, v in gen.items()}, tmp_path / "torch_model.p")
    result = weights.convert(str(tmp_path / "torch_model.p"))
    assert (result["format"], result["semantics"], result["critics"]) == ("port", "tf", None)
    _assert_same(result["generator"], {f"netG.{k}": v for k, v in gen.items()},
                 [(o, f"netG.{s}") for o, s in _generator_pairs(_port_generator_layers(32))])
    assert weights.convert(str(tmp_path / "torch_model.p"), semantics="torch")["semantics"] == "torch"

    ckpt = mmagic_checkpoint()
    torch.save(ckpt, tmp_path / "deepfillv1_256x256_8x2_places_20200619-c00a0e21.pth")
    result = weights.convert(str(tmp_path / "deepfillv1_256x256_8x2_places_20200619-c00a0e21.pth"), "mmagic")
    assert (result["format"], result["cnum"], result["semantics"]) == ("mmagic", 32, "torch")
    sd = ckpt["state_dict"]
    stage1, attn, conv, neck, dil2, decoder = _mmagic_generator_layers(32)
    ordered = stage1 + conv + dil2 + attn + neck + decoder  # our order: dilated branch, attention branch, decoder
    _assert_same(result["generator"], sd, _generator_pairs(ordered))
    for side, spec in (("global", _mmagic_critic(False)), ("local", _mmagic_critic(True))):
        convs, (linear, _) = spec
        ours = result["critics"][side]
        for i, (name, *_) in enumerate(convs):
            assert torch.equal(ours[f"features.{i}.conv.weight"], sd[f"disc.{side}_disc.{name}.weight"])
        assert torch.equal(ours["linear.weight"], sd[f"disc.{side}_disc.{linear}.weight"])
    models.local_critic(64, 128).load_state_dict(result["critics"]["local"])
    assert set(result["ignored"]) == {"meta", "generator.stage2.contextual_attention_neck.contextual_attention.fuse_kernel"}
    assert any("reflection" in n for n in result["notes"])


def test_auto_detection_by_keys_and_what_it_refuses():
    assert weights.detect_format(port_generator(8)) == "port"
    assert weights.detect_format([f"module.{k}" for k in port_generator(8)]) == "port"
    assert weights.detect_format({f"netG.{k}" for k in port_generator(8)}) == "port"
    assert weights.detect_format(weights.flat_tensors(port_critics(8))) == "port"
    assert weights.detect_format(mmagic_checkpoint(8)["state_dict"]) == "mmagic"
    assert weights.detect_format(["inpaint_net/conv1/kernel"]) == "tf"
    with pytest.raises(ValueError, match="saw top-level names: decoder, encoder"):
        weights.detect_format(["encoder.0.weight", "decoder.0.weight"])
    with pytest.raises(ValueError, match="already a deepfill-ray generator"):
        weights.detect_format(models.InpaintGenerator(4).state_dict())


def test_every_tensor_used_and_every_parameter_filled():
    gen = port_generator(8)
    missing = dict(gen)
    del missing["fine_generator.allconv13.conv.bias"]
    with pytest.raises(ValueError, match=r"no fine_generator.allconv13.conv.bias for our refine_dec.2.conv.conv.bias \(16,\)"):
        weights.convert(missing)
    wrong = dict(gen, **{"fine_generator.pmconv5.conv.weight": torch.zeros(32, 16, 3, 3)})
    with pytest.raises(ValueError, match=r"pmconv5.conv.weight has shape \(32, 16, 3, 3\), our refine_attn_in.4.conv.weight "
                                         r"needs \(32, 32, 3, 3\)"):
        weights.convert(wrong)
    with pytest.raises(ValueError, match=r"unexpected source tensor fine_generator.extra.weight \(3,\)"):
        weights.convert(dict(gen, **{"fine_generator.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="non-finite"):
        weights.convert(dict(gen, **{"coarse_generator.conv3.conv.bias": torch.full((16,), float("nan"))}))
    with pytest.raises(ValueError, match="keys are mmagic's"):
        weights.convert(mmagic_checkpoint(8), "port")
    with pytest.raises(ValueError, match="critics only"):
        weights.convert(port_critics(8))


def test_safetensors_are_read_without_a_dependency(tmp_path):
    gen = port_generator(8)
    header, blobs, offset = {}, [], 0
    for k, v in gen.items():
        raw = v.contiguous().numpy().astype("<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    data = len(head).to_bytes(8, "little") + head + b"".join(blobs)
    (tmp_path / "w.safetensors").write_bytes(data)
    result = weights.convert(str(tmp_path / "w.safetensors"))
    assert result["cnum"] == 8 and all(torch.equal(result["generator"][o], gen[s]) for o, s in
                                       _generator_pairs(_port_generator_layers(8)))
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="outside the file"):
        weights.convert(str(tmp_path / "cut.safetensors"))


# ----------------------------------------------------------------------------------------- the CLI

class _Code:
    """Unpickling this would run code (here: create a file)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture()
def port_file(tmp_path):
    path = tmp_path / "release" / "gen_00000100.pt"
    path.parent.mkdir()
    torch.save(port_generator(8, seed=5), path)
    return path


def _bad_files(tmp_path, port_file):
    good = port_file.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": _Code(tmp_path / "ran")}, tmp_path / "code.pt")
    torch.save(models.local_critic(8, 32).state_dict(), tmp_path / "other_model.pt")
    torch.save([torch.zeros(3)], tmp_path / "a_list.pt")
    return {
        "missing.pt": "no such file, folder or TF checkpoint prefix",
        "empty.pt": "the file is empty",
        "cut.pt": "truncated or corrupt",
        "noise.pt": "truncated or corrupt",
        "code.pt": "refusing to unpickle code: code.pt needs io.open",
        "other_model.pt": "unknown weights format",
        "a_list.pt": "expected a dict of tensors",
    }


def test_hostile_sources_are_one_line_and_write_nothing(tmp_path, port_file, capsys):
    cases = _bad_files(tmp_path, port_file)
    for name, message in cases.items():
        out = tmp_path / f"out-{name}"
        code = cli.main(["import", "--source", str(tmp_path / name), "--output", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and message in err and len(err.splitlines()) == 1, (name, err)
        assert not out.exists()
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran
    # bad options: exit 2 (jobs.cli), before anything is read
    assert cli.main(["import", "--source", str(port_file)]) == 2
    assert "give --register NAME" in capsys.readouterr().err
    assert cli.main(["import", "--source", str(port_file), "--register", "a/b"]) == 2
    assert cli.main(["import", "--source", str(port_file), "--output", str(port_file)]) == 2
    assert cli.main(["import", "--source", str(port_file), "--set", "format=keras", "--output", "x.pt"]) == 2
    assert cli.main(["import", "--source", str(port_file), "--register", "m", "--alias", "latest"]) == 2
    capsys.readouterr()
    # a folder with two kinds of checkpoint is refused with the candidates
    torch.save(mmagic_checkpoint(8), port_file.parent / "mm.pth")
    assert cli.main(["import", "--source", str(port_file.parent), "--output", str(tmp_path / "o.pt")]) == 1
    assert "more than one kind of checkpoint" in capsys.readouterr().err


@pytest.fixture()
def sqlite_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_import_registers_a_model_that_gives_the_converted_pixels(tmp_path, port_file, sqlite_mlflow, capsys):
    from jobs import serving

    mlflow = sqlite_mlflow
    dis = port_critics(8)
    torch.save(dis, port_file.parent / "dis_00000100.pt")
    out, critics_out = tmp_path / "imported.pt", tmp_path / "imported.critics.pt"
    code = cli.main(["import", "--source", str(port_file.parent), "--register", "deepfill-port", "--alias",
                     "imported", "--output", str(out), "--critics-output", str(critics_out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)


    sha = hashlib.sha256(port_file.read_bytes()).hexdigest()
    assert summary["format"] == "port" and summary["source_name"] == "gen_00000100.pt" and summary["sha256"] == sha
    assert (summary["version"], summary["alias"], summary["critics"]) == ("1", "imported", "global")

    # the registered model loads through our loader and gives exactly the converted weights' pixels
    generator, info = serving.load_generator("models:/deepfill-port@imported", device="cpu")
    assert info["model_version"] == "1"
    reference = weights.build_generator(weights.convert(str(port_file))).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    mask = np.zeros((1, 32, 32, 1), np.uint8)
    mask[:, 8:20, 10:22] = 1
    assert np.array_equal(models.inpaint_uint8(generator, image, mask), models.inpaint_uint8(reference, image, mask))

    # provenance in the file, tags on the run and the version, the critics beside the model
    _, meta = models.checkpoint.load_generator(str(out))
    prov = meta["extra"]["import"]
    assert (prov["format"], prov["sha256"], prov["source_name"], prov["critics_source_name"]) == (
        "port", sha, "gen_00000100.pt", "dis_00000100.pt")
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.tags["deepfill.import.format"] == "port" and run.data.tags["deepfill.import.sha256"] == sha
    assert run.data.tags["deepfill.import.source_name"] == "gen_00000100.pt"
    assert mlflow.get_experiment(run.info.experiment_id).name == "deepfill-import"
    version = mlflow.MlflowClient().get_model_version("deepfill-port", "1")
    assert version.tags["deepfill.import.sha256"] == sha
    from jobs.import_weights import fetch_critics

    critics, cinfo = fetch_critics("models:/deepfill-port@imported")
    assert cinfo["model_version"] == "1" and critics["local"] is None
    assert torch.equal(critics["global"]["linear.weight"], dis["globalD"]["linear.weight"])
    assert torch.equal(weights.load_critics(str(critics_out))["global"]["linear.weight"], dis["globalD"]["linear.weight"])

    # a hostile source registers nothing
    torch.save({"w": _Code(tmp_path / "ran")}, tmp_path / "code.pt")
    assert cli.main(["import", "--source", str(tmp_path / "code.pt"), "--register", "deepfill-port"]) == 1
    assert "refusing to unpickle code" in capsys.readouterr().err
    assert len(mlflow.MlflowClient().search_model_versions("name='deepfill-port'")) == 1


def test_the_tf_release_imports_through_models_weights_tf(tmp_path, capsys):
    """The TF branch delegates to models.weights_tf (its fixture: a checkpoint TensorFlow wrote)."""
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "tf_release"
    assert (fixture / "snap.index").is_file(), "the committed TF fixture is missing (tests/fixtures/tf_release)"
    out = tmp_path / "tf.pt"
    assert cli.main(["import", "--source", str(fixture), "--output", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert (summary["format"], summary["semantics"], summary["source_name"]) == ("tf", "tf", "snap")
    generator, meta = models.checkpoint.load_generator(str(out))
    assert meta["model"]["semantics"] == "tf" and generator.semantics == "tf"
    direct = weights.convert(str(fixture / "snap"), "tf")
    assert all(isinstance(why, str) for why in direct["ignored"].values())
    assert all(torch.equal(generator.state_dict()[k], v) for k, v in direct["generator"].items())
