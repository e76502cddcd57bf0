"""The paper's ablation switches: gan.loss, loss.spatial_discount, gan.l1_weight: 0, model.attention: none,
and the configs/ablations arms. CPU, tiny networks, no Ray."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

import models
from models import checkpoint, losses
from models.gan import GanOptions, LossOptions, critic_step, generator_step
from models.generator import InpaintGenerator
from tests.test_gan import SIZE, _setup  # the tiny networks and sizes of the GAN step tests

ABLATIONS = Path(__file__).resolve().parents[1] / "configs" / "ablations"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed: int = 1, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, SIZE, SIZE, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    mask = torch.zeros(b, 1, SIZE, SIZE)
    mask[0, :, 8:20, 6:18] = 1  # one box per sample, different places
    mask[1, :, 14:30, 10:22] = 1
    weight = losses.spatial_discount(mask)  # (B, 1, H, W), < 1 inside the holes
    return image, mask, weight


# ----------------------------------------------------------------------------------------- the GAN losses

D_REAL = [1.0, -2.0]  # hand-made critic outputs, (B, 1) with B = 2
D_FAKE = [0.5, 3.0]


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# name -> (critic loss, d critic / d d_real, d critic / d d_fake, generator loss, d generator / d d_fake),
# each by hand from the closed form (means over B = 2)
EXPECTED = {
    "wgan_gp": (
        (0.5 + 3.0) / 2 - (1.0 - 2.0) / 2,  # mean D(fake) - mean D(real) = 2.25
        [-0.5, -0.5], [0.5, 0.5],
        -(0.5 + 3.0) / 2, [-0.5, -0.5],
    ),
    "dcgan": (
        sum(_softplus(-r) for r in D_REAL) / 2 + sum(_softplus(f) for f in D_FAKE) / 2,  # -log s(r), -log(1-s(f))
        [-_sigmoid(-r) / 2 for r in D_REAL], [_sigmoid(f) / 2 for f in D_FAKE],
        sum(_softplus(-f) for f in D_FAKE) / 2, [-_sigmoid(-f) / 2 for f in D_FAKE],
    ),
    "lsgan": (
        0.5 * (0.0 + 9.0) / 2 + 0.5 * (0.25 + 9.0) / 2,  # 0.5 mean (r-1)^2 + 0.5 mean f^2 = 4.5625
        [(r - 1) / 2 for r in D_REAL], [f / 2 for f in D_FAKE],
        0.5 * (0.25 + 4.0) / 2, [(f - 1) / 2 for f in D_FAKE],  # 0.5 mean (f-1)^2 = 1.0625
    ),
}


def test_the_factory_names_every_loss_and_refuses_others():
    assert losses.GAN_LOSSES == ("wgan_gp", "dcgan", "lsgan")
    assert [losses.gan_loss(n).gradient_penalty for n in losses.GAN_LOSSES] == [True, False, False]
    assert all(losses.gan_loss(n).name == n for n in losses.GAN_LOSSES)
    wgan = losses.gan_loss("wgan_gp")  # the default is the existing WGAN pair
    assert (wgan.critic, wgan.generator) == (losses.critic_loss, losses.generator_adv_loss)
    with pytest.raises(ValueError, match=r"unknown gan\.loss 'hinge': expected one of wgan_gp, dcgan, lsgan"):
        losses.gan_loss("hinge")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_gan_loss_value_and_gradient_match_the_closed_form(name):
    critic_value, grad_real, grad_fake, gen_value, gen_grad = EXPECTED[name]
    objective = losses.gan_loss(name)
    d_real = torch.tensor(D_REAL, dtype=torch.float64).view(2, 1).requires_grad_(True)
    d_fake = torch.tensor(D_FAKE, dtype=torch.float64).view(2, 1).requires_grad_(True)
    loss = objective.critic(d_real, d_fake)
    assert loss.dim() == 0 and math.isclose(loss.item(), critic_value, rel_tol=1e-12)
    g_real, g_fake = torch.autograd.grad(loss, (d_real, d_fake))
    assert torch.allclose(g_real.flatten(), torch.tensor(grad_real, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(g_fake.flatten(), torch.tensor(grad_fake, dtype=torch.float64), rtol=1e-12, atol=0)
    gen_loss = objective.generator(d_fake)
    assert gen_loss.dim() == 0 and math.isclose(gen_loss.item(), gen_value, rel_tol=1e-12)
    (g,) = torch.autograd.grad(gen_loss, d_fake)
    assert torch.allclose(g.flatten(), torch.tensor(gen_grad, dtype=torch.float64), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------- the GAN steps

@pytest.mark.parametrize("name", losses.GAN_LOSSES)
def test_critic_step_uses_the_chosen_loss_for_both_critics(name):
    gen, local, glob, _, opt_d = _setup()
    image, mask, _ = _batch()
    objective = losses.gan_loss(name)
    with torch.no_grad():  # what the step's loss must be, from the critics before the update
        fake = gen(image, mask)[1] * mask + image * (1 - mask)
        crop = lambda x: models.crop_around_holes(x, mask, SIZE // 2)  # noqa: E731
        adv = (objective.critic(local(crop(image)), local(crop(fake)))
               + objective.critic(glob(image), glob(fake))).item()
    out = critic_step(gen, local, glob, opt_d, image, mask, local_size=SIZE // 2, gan=GanOptions(loss=name))
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    if name == "wgan_gp":
        assert set(out) == {"d_loss", "d_wasserstein", "d_gp"}  # the keys MLflow has always had
        assert math.isclose(out["d_wasserstein"], -adv, rel_tol=1e-4, abs_tol=1e-6)
        assert out["d_gp"] >= 0
    else:
        assert set(out) == {"d_loss", "d_adv", "d_gp"} and out["d_gp"] == 0.0
        assert out["d_loss"] == out["d_adv"]
        assert math.isclose(out["d_adv"], adv, rel_tol=1e-4, abs_tol=1e-6)
    assert all(p.grad is not None for p in list(local.parameters()) + list(glob.parameters()))
    assert all(p.grad is None for p in gen.parameters())


@pytest.mark.parametrize("name", losses.GAN_LOSSES)
def test_generator_step_uses_the_chosen_loss(name):
    gen, local, glob, opt_g, _ = _setup()
    image, mask, weight = _batch()
    objective = losses.gan_loss(name)
    with torch.no_grad():
        fake = gen(image, mask)[1] * mask + image * (1 - mask)
        adv = (objective.generator(local(models.crop_around_holes(fake, mask, SIZE // 2)))
               + objective.generator(glob(fake))).item()
    out = generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2,
                         gan=GanOptions(loss=name))
    assert set(out) == {"g_loss", "g_l1", "g_ae", "g_adv"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert math.isclose(out["g_adv"], adv, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(out["g_loss"], 1.2 * out["g_l1"] + 1.2 * out["g_ae"] + 0.001 * out["g_adv"],
                        rel_tol=1e-5, abs_tol=1e-6)


def test_without_spatial_discount_the_hole_l1_is_the_plain_one():
    gen, local, glob, opt_g, _ = _setup()
    image, mask, weight = _batch()
    with torch.no_grad():
        coarse, refined, _ = gen(image, mask)
    hole = mask.sum() * 3  # hole pixels times channels
    plain = 1.2 * ((image - coarse).abs() * mask).sum() / hole + ((image - refined).abs() * mask).sum() / hole
    discounted = losses.l1_loss(image, coarse, refined, mask, weight).item()
    state = {k: v.clone() for k, v in gen.state_dict().items()}
    out = generator_step(gen, local, glob, opt_g, image, mask, weight, local_size=SIZE // 2,
                         loss=LossOptions(spatial_discount=False))
    assert math.isclose(out["g_l1"], plain.item(), rel_tol=1e-5)
    assert discounted < 0.9 * plain.item()  # the weight really is ignored: discounting would lower it
    gen.load_state_dict(state)
    default = generator_step(gen, local, glob, torch.optim.Adam(gen.parameters()), image, mask, weight,
                             local_size=SIZE // 2)
    assert math.isclose(default["g_l1"], discounted, rel_tol=1e-5)  # loss.spatial_discount: true, the default


def test_loss_options_and_gan_options_validate_and_document():
    from jobs.options import field_help

    assert LossOptions().spatial_discount is True and GanOptions().loss == "wgan_gp"
    assert field_help(GanOptions)["loss"] and field_help(LossOptions)["spatial_discount"]
    GanOptions(l1_weight=0)  # the reconstruction ablation: the AE and adversarial terms remain
    GanOptions(l1_weight=0, ae_weight=0)
    with pytest.raises(ValueError, match=r"gan\.l1_weight, gan\.ae_weight and gan\.gan_weight are all 0"):
        GanOptions(l1_weight=0, ae_weight=0, gan_weight=0)
    with pytest.raises(ValueError, match=r"unknown gan\.loss 'wgan'"):
        GanOptions(loss="wgan")


# ----------------------------------------------------------------------------------------- the baseline

def test_the_baseline_has_the_documented_parameter_count():
    count = lambda g: sum(p.numel() for p in g.parameters())  # noqa: E731
    with torch.device("meta"):
        full, baseline = InpaintGenerator(32), InpaintGenerator(32, attention="none")
    assert count(full) == 3_601_542
    assert count(baseline) == 2_758_118 < count(full)
    assert f"{count(baseline):,}" in InpaintGenerator.__doc__
    assert baseline.attention is None and baseline.attention_kind == "none"
    assert not any(k.startswith(("refine_attn", "attention")) for k in baseline.state_dict())
    assert baseline.refine_dec[0].conv.in_channels == 4 * 32 and full.refine_dec[0].conv.in_channels == 8 * 32
    with pytest.raises(ValueError, match="unknown attention 'self'"):
        InpaintGenerator(4, attention="self")


def test_the_baseline_forward_gives_the_same_shapes_and_zero_offsets():
    torch.manual_seed(0)
    full, baseline = InpaintGenerator(8), InpaintGenerator(8, attention="none")
    image, mask, _ = _batch()
    outs = [g(image, mask) for g in (full, baseline)]
    for a, b in zip(*outs):
        assert a.shape == b.shape and a.dtype == b.dtype
    coarse, refined, offsets = outs[1]
    assert refined.abs().max() <= 1 and torch.isfinite(coarse).all()
    assert offsets.shape == (2, 2, SIZE // 8, SIZE // 8) and not offsets.any()
    assert torch.equal(refined, baseline(image, mask, holes_only=True)[1])  # nothing to skip


def test_the_baseline_round_trips_through_a_checkpoint():
    from models.weights import check_generator_state, make_generator

    torch.manual_seed(0)
    gen = make_generator(8, attention="none")
    assert gen.attention_kind == "none"
    buf = io.BytesIO()
    checkpoint.save_generator(buf, gen, step=3)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert raw["model"] == {"cnum": 8, "attention": "none"}
    buf.seek(0)
    loaded, meta = checkpoint.load_generator(buf)
    assert loaded.attention_kind == "none" and meta["model"]["attention"] == "none" and meta["step"] == 3
    image, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(gen(image, mask)[1], loaded(image, mask)[1])
    check_generator_state(raw["generator"], 8, attention="none")
    with pytest.raises(ValueError, match="no tensor for refine_attn_in"):
        check_generator_state(raw["generator"], 8)
    # DeepFill v1 files are as before: no attention key, and such a file loads as contextual
    default = checkpoint.generator_state(make_generator(8))
    assert default["model"] == {"cnum": 8}
    assert checkpoint.generator_from_state(default)[1]["model"]["attention"] == "contextual"


def test_the_baseline_inpaints_through_the_one_inference_path():
    # needs models/inpaint.py to read generator.attention only when it is not None
    from models.visualize import flow_to_image

    torch.manual_seed(0)
    gen = InpaintGenerator(8, attention="none")
    image, mask, _ = _batch()
    image = image[:, :, :30, :27]  # any size: inpaint pads to a multiple of 8
    mask = mask[:, :, :30, :27]
    out, offsets = models.inpaint(gen, image, mask, return_offsets=True, max_score_bytes=1024)
    assert out.shape == image.shape and torch.equal(out[mask.expand_as(out) == 0], image[mask.expand_as(image) == 0])
    assert offsets.shape == (2, 2, 4, 4) and not offsets.any()
    assert (flow_to_image(offsets) == 255).all()  # a white attention picture
    assert torch.equal(out, models.inpaint(gen, image, mask))


# ----------------------------------------------------------------------------------------- the config arms

ARMS = {  # file -> (name, the values it sets, as key path -> value)
    "wgan_gp.yaml": ("ablation-wgan-gp", {"gan.loss": "wgan_gp"}),
    "dcgan.yaml": ("ablation-dcgan", {"gan.loss": "dcgan"}),
    "lsgan.yaml": ("ablation-lsgan", {"gan.loss": "lsgan"}),
    "no_attention.yaml": ("ablation-no-attention", {"model.attention": "none"}),
    "no_spatial_discount.yaml": ("ablation-no-spatial-discount", {"loss.spatial_discount": False}),
    "no_l1.yaml": ("ablation-no-l1", {"gan.l1_weight": 0}),
}
DEFAULTS = {"gan.loss": "wgan_gp", "model.attention": "contextual", "loss.spatial_discount": True,
            "gan.l1_weight": 1.2}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_arm_is_shipped_and_is_the_base_plus_its_own_lines():
    from jobs.options import read_yaml

    assert {p.name for p in ABLATIONS.glob("*.yaml")} == set(ARMS) | {"base.yaml"}
    base = _flat(read_yaml(ABLATIONS / "base.yaml"))
    assert base == {**_flat(read_yaml(ABLATIONS.parent / "demo.yaml")), "name": "ablation",
                    "log_every": 10, "val_every": 20, "tracking.experiment": "deepfill-ablations",
                    "tracking.registered_model": "", "tracking.alias": ""}
    for file, (name, values) in ARMS.items():
        assert _flat(read_yaml(ABLATIONS / file)) == {**base, "name": name, **values}, file


@pytest.mark.parametrize("file", list(ARMS))
def test_every_arm_loads_through_the_training_config(file):
    # needs TrainConfig.loss (LossOptions) and ModelOptions.attention (jobs/train_config.py)
    from jobs.options import flatten, load_config
    from jobs.train_config import TrainConfig

    name, values = ARMS[file]
    flat = flatten(load_config(TrainConfig, ABLATIONS / file))
    assert flat["name"] == name
    assert {k: flat[k] for k in DEFAULTS} == {**DEFAULTS, **values}


def test_a_config_with_every_switch_trains_two_steps_and_checkpoints(tmp_path):
    """Every ablation switch at once, through the training job's own pieces (no Ray: local-mode Ray Train
    keeps no checkpoint): its networks and optimisers, two critic + generator steps with the config's
    options, a training checkpoint that loads back with weights_only into the same networks, and a
    generator file that loads as the baseline."""
    from jobs import train_state
    from jobs.options import from_dict, load_config, to_dict
    from jobs.train_config import TrainConfig
    from jobs.trainer import build_networks, build_optimizers

    cfg = load_config(TrainConfig, ABLATIONS / "base.yaml", [
        "gan.loss=dcgan", "model.attention=none", "loss.spatial_discount=false", "gan.l1_weight=0",
        "model.cnum=4", "model.critic_cnum=4", f"data.crop_size={SIZE}"])
    nets = build_networks(cfg)
    opt_g, opt_d = build_optimizers(cfg, *nets)
    image, mask, weight = _batch()
    for _ in range(2):
        d = critic_step(*nets, opt_d, image, mask, local_size=SIZE // 2, gan=cfg.gan)
        g = generator_step(*nets, opt_g, image, mask, weight, local_size=SIZE // 2, gan=cfg.gan, loss=cfg.loss)
        assert all(math.isfinite(v) for v in {**d, **g}.values()) and "d_adv" in d
    train_state.save_train_state(tmp_path, generator=nets[0], local_critic=nets[1], global_critic=nets[2],
                                 opt_g=opt_g, opt_d=opt_d, step=2, rng=[], config=to_dict(cfg), mlflow_run_id="r")
    state = train_state.load_train_state(tmp_path)
    saved = from_dict(TrainConfig, state["config"])
    assert (saved.gan.loss, saved.model.attention, saved.loss.spatial_discount, saved.gan.l1_weight) == \
        ("dcgan", "none", False, 0.0)
    again = build_networks(saved)
    for net, key, trained in zip(again, ("generator", "local_critic", "global_critic"), nets):
        net.load_state_dict(state[key])
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), trained.state_dict().values()))
    generator, meta = checkpoint.load_generator(tmp_path / train_state.GENERATOR_FILENAME)
    assert generator.attention is None and meta["model"]["attention"] == "none"
