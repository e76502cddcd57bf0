"""jobs.options: YAML in, --set overrides, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from jobs.options import ConfigError, apply_overrides, dump_yaml, flatten, from_dict, load_config


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


def test_a_config_file_builds_on_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ngan:\n  gp_weight: 5\n  n_critic: 3\nscaling:\n  use_gpu: true\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\ngan:\n  n_critic: 2\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nname: top\n")  # relative to its own folder
    cfg = load_config(Job, tmp_path / "sub" / "top.yaml", ["scaling.num_workers=4"])
    assert (cfg.name, cfg.gan.gp_weight, cfg.gan.n_critic) == ("top", 5.0, 2)  # merged key by key
    assert cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 4
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="'base' loops back"):
        load_config(Job, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: cannot read the config file"):
        load_config(Job, tmp_path / "c.yaml")


def test_parse_errors_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("gan:\n  n_critic: [1\n")
    for call in (lambda: load_config(Job, tmp_path / "bad.yaml"),
                 lambda: load_config(Job, None, ["gan.n_critic=[1"]),
                 lambda: load_config(Job, None, ["kind={a: [}"])):
        with pytest.raises(ConfigError) as err:
            call()
        assert "\n" not in str(err.value) and "invalid YAML at line" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 3"):
        load_config(Job, tmp_path / "bad.yaml")


def test_help_comes_from_the_field_comments():
    from jobs.options import describe, field_help

    assert field_help(Gan) == {"gp_weight": "gradient-penalty weight"}
    rows = {path: (type_name, default, text) for path, type_name, default, text in describe(Job)}
    assert rows["gan.gp_weight"] == ("float", 10.0, "gradient-penalty weight")
    assert rows["kind"][0] == "box|strokes" and rows["scaling.storage"][0] == "str or null"


@dataclass
class Flat:
    src: str  # where the images are
    size: int = 8  # tile size
    fast: bool = False  # go fast
    mode: Literal["a", "b"] = "a"  # which mode
    group: Gan = field(default_factory=Gan)


def test_flags_are_generated_and_precede_the_file_but_not_set(tmp_path, capsys):
    import argparse

    from jobs.options import add_options, from_args

    parser = argparse.ArgumentParser(prog="job")
    add_options(parser, Flat)
    (tmp_path / "job.yaml").write_text("src: from-file\nsize: 3\nfast: true\n")
    args = parser.parse_args(["--config", str(tmp_path / "job.yaml"), "--size", "5", "--no-fast",
                              "--set", "size=6", "--set", "group.n_critic=4"])
    opts = from_args(Flat, args)
    assert (opts.src, opts.size, opts.fast, opts.mode, opts.group.n_critic) == ("from-file", 6, False, "a", 4)
    opts = from_args(Flat, parser.parse_args(["--src", "x", "--size", "5", "--fast", "--mode", "b"]))
    assert (opts.src, opts.size, opts.fast, opts.mode) == ("x", 5, True, "b")
    with pytest.raises(ConfigError, match=r"missing option\(s\): src \(--src\)"):
        from_args(Flat, parser.parse_args([]))
    with pytest.raises(ConfigError, match="size: expected an integer, got 'big'"):
        from_args(Flat, parser.parse_args(["--src", "x", "--size", "big"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--src", "x", "--mode", "c"])  # choices come from the Literal
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--src SRC where the images are (required)" in text and "--size N tile size (default: 8)" in text
    assert "--fast, --no-fast go fast (default: off)" in text
    assert "group.gp_weight (float = 10.0) gradient-penalty weight" in text  # nested options in the epilog


@dataclass
class Numbers:
    rate: float = 0.1  # a rate
    weights: dict[str, float] = field(default_factory=dict)  # named weights
    sizes: list[float] = field(default_factory=list)  # sizes
    ceiling: float = field(default=float("inf"), metadata={"non_finite_ok": True})  # may be infinite


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "nan", "-Infinity", "1e400"])
def test_non_finite_floats_are_refused_by_name(text, tmp_path):
    with pytest.raises(ConfigError, match=r"^rate: must be a finite number"):
        load_config(Numbers, None, [f"rate={text}"])
    with pytest.raises(ConfigError, match=r"^weights\.a: must be a finite number"):
        load_config(Numbers, None, [f"weights={{a: {text}}}"])
    with pytest.raises(ConfigError, match=r"^sizes\[1\]: must be a finite number"):
        load_config(Numbers, None, [f"sizes=[1, {text}]"])
    (tmp_path / "n.yaml").write_text(f"rate: {text}\n")
    with pytest.raises(ConfigError, match=r"^rate: must be a finite number"):
        load_config(Numbers, tmp_path / "n.yaml")
    # a field that genuinely accepts infinity opts out with its metadata
    assert load_config(Numbers, None, [f"ceiling={text}"]).ceiling != 0.1


def test_an_integer_too_large_for_a_float_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^rate: expected a number"):
        from_dict(Numbers, {"rate": 10**400})


@pytest.mark.parametrize("value, problem", [
    ("", "must not be empty"), ("..", "'..' path segment"), (".", "'..' path segment"),
    ("a/b", "must not contain '/'"), ("a\\b", "must not contain '\\\\'"),
    ("bell\x07", "control characters"), ("new\nline", "control characters"), ("del\x7f", "control characters"),
    (" lead", "whitespace"), ("trail\t", "control characters"),
])
def test_check_name_refuses_unsafe_names_by_option(value, problem):
    from jobs.options import check_name

    with pytest.raises(ValueError, match=r"^my\.name ") as err:
        check_name(value, "my.name")
    assert problem in str(err.value)
    if not set(value) & set("/\\"):  # the same with "/" and "\\" allowed (an MLflow workspace path)
        with pytest.raises(ValueError, match=r"^my\.name "):
            check_name(value, "my.name", forbid="")
    with pytest.raises(ValueError, match=r"'\.\.' path segment"):
        check_name("/Users/../admin", "my.name", forbid="")


def test_check_name_accepts_ordinary_names():
    from jobs.options import check_name

    for value in ("run-1", "places2.v2", "deepfill_tiny", "Ünïcode name"):
        check_name(value, "name")
    check_name("", "name", allow_empty=True)
    check_name("/Users/me/deepfill", "tracking.experiment", forbid="")  # a workspace path
