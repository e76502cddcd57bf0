"""Every shipped config loads through the training config; overrides and validation name the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.options import ConfigError, flatten, from_dict, load_config, to_dict
from jobs.train_config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_reference_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "places2.yaml", "celeba_hq.yaml", "imagenet.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.steps >= 1 and cfg.batch_size >= 1
    assert cfg.data.crop_size % 16 == 0
    # the resolved config survives a round trip, and its key paths are the MLflow param names
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert "gan.gp_weight" in flat and "data.storage.endpoint_url" in flat


def test_reference_hyperparameters_in_places2():
    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / "places2.yaml")
    assert (cfg.data.crop_size, cfg.batch_size, cfg.gan.n_critic) == (256, 16, 5)
    assert (cfg.optim.lr_generator, cfg.optim.beta1, cfg.optim.beta2) == (1e-4, 0.5, 0.9)
    g = cfg.gan
    assert (g.l1_weight, g.ae_weight, g.gan_weight, g.gp_weight, g.coarse_weight) == (1.2, 1.2, 0.001, 10.0, 1.2)
    assert cfg.data.shards.startswith("s3://") and cfg.checkpoint.storage_path.startswith("s3://")
    assert cfg.scaling.use_gpu


def test_set_overrides_use_the_key_paths():
    cfg = load_config(TrainConfig, None, ["gan.n_critic=2", "data.crop_size=128", "scaling.num_workers=3",
                                          "tracking.alias=staging", "scaling.custom_resources={trainer: 1}"])
    assert (cfg.gan.n_critic, cfg.data.crop_size, cfg.scaling.num_workers) == (2, 128, 3)
    assert cfg.tracking.alias == "staging"
    assert cfg.scaling.custom_resources == {"trainer": 1}


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["gan.gp_wieght=3"])
    assert "gp_wieght" in str(err.value) and "gp_weight" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"optim": {"lr": 1.0}})
    assert "lr_generator" in str(err.value)


@pytest.mark.parametrize("override, option", [
    ("gan.n_critic=0", "gan.n_critic"),
    ("steps=0", "steps"),
    ("data.crop_size=72", "data.crop_size"),  # a multiple of 8 but not of 16
    ("optim.beta2=1.5", "optim.beta2"),
    ("checkpoint.every=0", "checkpoint.every"),
    ("scaling.custom_resources={CPU: 2}", "scaling.custom_resources.CPU"),
    ("debug.step_delay_s=-1", "debug.step_delay_s"),
    # non-finite numbers, for every float option (jobs.options)
    ("optim.lr_generator=.inf", "optim.lr_generator: must be a finite number"),
    ("optim.lr_critic=nan", "optim.lr_critic: must be a finite number"),
    ("gan.gp_weight=.nan", "gan.gp_weight: must be a finite number"),  # nan passed `< 0`
    ("masks.gamma=inf", "masks.gamma: must be a finite number"),
    ("scaling.custom_resources={trainer: .inf}", "scaling.custom_resources.trainer: must be a finite number"),
    ("data.stall_timeout_s=-1", "data.stall_timeout_s"),
    ("data.stall_timeout_s=.inf", "data.stall_timeout_s: must be a finite number"),
    # names that become folders, MLflow runs and registry names
    ("name=..", "name must not be or contain a '.' or '..'"),
    ("name=a/b", "name must not contain '/'"),
    ("name=''", "name must not be empty"),
    ("name=\"run\\x07\"", "name must not contain control characters"),
    ("tracking.experiment=''", "tracking.experiment must not be empty"),
    ("tracking.experiment=..", "tracking.experiment must not be or contain"),
    ("tracking.experiment=\"exp\\n\"", "tracking.experiment must not contain control characters"),
    ("tracking.registered_model=a/b", "tracking.registered_model must not contain '/'"),
    ("tracking.registered_model=a:b", "tracking.registered_model must not contain ':'"),
    ("tracking.registered_model=..", "tracking.registered_model must not be or contain"),
    ("tracking.alias=latest", "tracking.alias"),
    ("tracking.alias=v3", "tracking.alias"),
    ("tracking.alias='a b'", "tracking.alias"),
    # counts and amounts that cannot work
    ("seed=-1", "seed must be in [0, 2**32)"),
    ("scaling.gpus_per_worker=-1", "scaling.gpus_per_worker"),
    ("scaling.custom_resources={'': 1}", "scaling.custom_resources."),
    ("scaling.num_workers=-1", "scaling.num_workers"),
    ("data.decode_workers=-2", "data.decode_workers"),
    ("log_every=0", "log_every"),
    ("batch_size=0", "batch_size"),
])
def test_validation_names_the_option(override, option):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert option in str(err.value)


def test_ordinary_names_still_load():
    cfg = load_config(TrainConfig, None, ["name=places2-run.v2", "tracking.experiment=/Users/me/deepfill",
                                          "tracking.registered_model=deepfill-v1.places2", "tracking.alias=prod_2",
                                          "tracking.registered_model=''", "tracking.alias=''"])
    assert cfg.name == "places2-run.v2" and cfg.tracking.experiment == "/Users/me/deepfill"


def test_cli_refuses_non_finite_numbers_for_every_job(capsys, tmp_path):
    from jobs import cli

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert cli.main(["train", "--config", tiny, "--set", "optim.lr_generator=.inf"]) == 2
    assert capsys.readouterr().err.strip() == "deepfill train: optim.lr_generator: must be a finite number, got inf"
    (tmp_path / "nan.yaml").write_text("base: " + tiny + "\ngan:\n  l1_weight: nan\n")
    assert cli.main(["train", "--config", str(tmp_path / "nan.yaml")]) == 2
    assert "deepfill train: gan.l1_weight: must be a finite number" in capsys.readouterr().err
    infer = ["infer", "--images", str(tmp_path), "--output", str(tmp_path / "out"), "--model", "m.pt",
             "--mask-preset", "box"]
    assert cli.main([*infer, "--num-cpus-per-actor", "inf"]) == 2
    assert capsys.readouterr().err.strip() == "deepfill infer: num_cpus_per_actor: must be a finite number, got 'inf'"
    assert cli.main(["prepare", "--src", str(tmp_path), "--dst", str(tmp_path / "s"), "--val-fraction", "nan"]) == 2
    assert capsys.readouterr().err.strip() == "deepfill prepare: val_fraction: must be a finite number, got 'nan'"


def test_cli_prints_the_resolved_config_and_rejects_bad_options(capsys):
    import yaml

    from jobs import cli

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert cli.main(["train", "--config", tiny, "--set", "gan.n_critic=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["gan"]["n_critic"] == 3 and printed["model"]["cnum"] == 8
    assert cli.main(["train", "--config", tiny, "--set", "gan.n_critic=0"]) == 2
    assert "gan.n_critic" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["celeba_hq.yaml", "imagenet.yaml"])
def test_the_other_datasets_state_only_what_differs_from_places2(name):
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    raw = yaml.safe_load((root / name).read_text())
    assert raw.pop("base") == "places2.yaml"
    base, cfg = flatten(load_config(TrainConfig, root / "places2.yaml")), flatten(load_config(TrainConfig, root / name))
    stated = flatten(raw)
    assert {k for k in cfg if cfg[k] != base[k]} == set(stated)  # every line stated differs, nothing else does
    assert all(cfg[k] == v for k, v in stated.items())


@pytest.mark.parametrize("command", ["prepare", "train", "infer", "evaluate"])
def test_every_option_of_every_subcommand_has_help(command):
    import importlib

    from jobs import cli
    from jobs.options import describe

    module = importlib.import_module(cli.COMMANDS[command][0])
    undocumented = [path for path, _, _, text in describe(module.Options) if not text]
    assert not undocumented, f"deepfill {command}: options without a help comment: {undocumented}"


def test_init_options_fine_tune_from_weights():
    cfg = load_config(TrainConfig, None, ["init.generator=models:/deepfill-places2@imported",
                                          "init.critics=s3://bucket/places2.critics.pt", "model.semantics=tf"])
    assert cfg.init.generator == "models:/deepfill-places2@imported" and cfg.model.semantics == "tf"
    flat = flatten(cfg)  # the sources are params of the run, under their key paths
    assert flat["init.generator"] == "models:/deepfill-places2@imported" and flat["init.critics"].startswith("s3://")
    assert load_config(TrainConfig).init.generator == "" and load_config(TrainConfig).model.semantics == "auto"


@pytest.mark.parametrize("override, option", [
    ("init.critics=critics.pt", "init.critics needs init.generator"),
    ("init.generator=' models:/x@y'", "init.generator must not start or end with whitespace"),
    ("model.semantics=keras", "model.semantics: 'keras' is not one of"),
])
def test_init_validation_names_the_option(override, option):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert option in str(err.value)


def test_the_finetune_example_starts_from_an_imported_model():
    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / "finetune_places2.yaml")
    assert cfg.init.generator == "models:/deepfill-places2@imported" and cfg.init.critics == ""
    assert cfg.model.cnum == 32 and cfg.data.crop_size == 256 and cfg.steps < 150_000
