"""jobs.config: YAML in, --set overrides, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from jobs.config import ConfigError, apply_overrides, dump_yaml, flatten, from_dict, load_config


@dataclass
class Gan:
    gp_weight: float = 10.0  # gradient-penalty weight
    n_critic: int = 5

    def __post_init__(self):
        if self.n_critic < 1:
            raise ValueError(f"gan.n_critic must be >= 1, got {self.n_critic}")


@dataclass
class Scaling:
    num_workers: int = 2
    use_gpu: bool = False
    storage: str | None = None


@dataclass
class Job:
    name: str = "run"
    kind: Literal["box", "strokes"] = "box"
    sizes: tuple[int, ...] = (256, 512)
    gan: Gan = field(default_factory=Gan)
    scaling: Scaling = field(default_factory=Scaling)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: demo\ngan:\n  gp_weight: 5\nscaling:\n  use_gpu: true\n")
    cfg = load_config(Job, path, ["gan.n_critic=2", "scaling.storage=s3://bucket/runs", "sizes=[64, 128]"])
    assert cfg.name == "demo"
    assert cfg.gan.gp_weight == 5.0 and isinstance(cfg.gan.gp_weight, float)
    assert cfg.gan.n_critic == 2
    assert cfg.scaling.use_gpu is True
    assert cfg.scaling.storage == "s3://bucket/runs"
    assert cfg.sizes == (64, 128)


def test_flatten_key_paths_match_set_paths():
    cfg = from_dict(Job, {})
    flat = flatten(cfg)
    assert flat["gan.gp_weight"] == 10.0
    assert flat["scaling.num_workers"] == 2
    # every flattened key is accepted back by --set
    data = apply_overrides({}, [f"{k}={v if v is not None else 'null'}" for k, v in flat.items() if k != "sizes"], Job)
    assert from_dict(Job, data) == cfg


def test_unknown_keys_rejected_with_valid_list(tmp_path):
    with pytest.raises(ConfigError, match=r"'gp_wieght'.*valid options: gp_weight, n_critic"):
        from_dict(Job, {"gan": {"gp_wieght": 1}})
    with pytest.raises(ConfigError, match=r"unknown option 'nope'.*valid options: gan, kind, name, scaling, sizes"):
        load_config(Job, None, ["nope=1"])
    with pytest.raises(ConfigError, match=r"unknown option 'x' in gan"):
        load_config(Job, None, ["gan.x=1"])


def test_validation_names_the_option():
    with pytest.raises(ConfigError, match=r"gan.n_critic must be >= 1, got 0"):
        load_config(Job, None, ["gan.n_critic=0"])
    with pytest.raises(ConfigError, match=r"gan.gp_weight: expected a number"):
        load_config(Job, None, ["gan.gp_weight=abc"])
    with pytest.raises(ConfigError, match=r"kind: 'disc' is not one of \['box', 'strokes'\]"):
        load_config(Job, None, ["kind=disc"])
    with pytest.raises(ConfigError, match=r"--set expects key.path=value"):
        load_config(Job, None, ["gan.n_critic"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(Job, None, ["gan.n_critic=3", "kind=strokes"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(Job, path) == cfg
