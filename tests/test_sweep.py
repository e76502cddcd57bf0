"""deepfill sweep: a 2 x 2 grid trained on real local Ray (Tune trials of Ray Train runs), tracked in a real
sqlite MLflow store, compared in one report; and the pieces it is built from (grid, concurrency, bootstrap).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import report, sweep
from jobs.cli import main
from jobs.options import load_config
from jobs.train import ClusterResources
from tests.imaging import copied_photos, split_seed

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------------------- bootstrap

def test_bootstrap_interval_holds_the_mean_narrows_with_more_images_and_is_seeded():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.2, 0.05, 20), rng.normal(0.2, 0.05, 2000)
    for values in (few, many):
        lo, hi = report.bootstrap_interval(values, resamples=1000, seed=0)
        assert lo < values.mean() < hi
    assert np.diff(report.bootstrap_interval(many, 1000, 0)) < 0.25 * np.diff(report.bootstrap_interval(few, 1000, 0))
    assert report.bootstrap_interval(few, 1000, 7) == report.bootstrap_interval(few, 1000, 7)
    assert report.bootstrap_interval(few, 1000, 7) != report.bootstrap_interval(few, 1000, 8)
    # the resamples are paired: a column gets the same intervals alone or next to others
    both = report.percentile_interval(report.bootstrap_means(np.stack([few, 2 * few], axis=1), 500, 3))
    np.testing.assert_allclose(both[0], report.bootstrap_interval(few, 500, 3))
    np.testing.assert_allclose(both[1], 2 * both[0])


def test_bootstrap_skips_undefined_values_and_keeps_infinite_ones():
    values = np.array([0.1, np.nan, 0.3, 0.2])  # a hole metric of an image without a hole is NaN
    lo, hi = report.bootstrap_interval(values, 200, 0)
    assert 0.1 <= lo <= hi <= 0.3
    lo, hi = report.bootstrap_interval(np.array([20.0, np.inf]), 200, 0)  # a perfect fill: PSNR inf
    assert lo == 20.0 and hi == np.inf
    assert all(np.isnan(report.bootstrap_interval(np.array([np.nan, np.nan]), 50, 0)))
    with pytest.raises(ValueError, match="at least one value"):
        report.bootstrap_means(np.zeros((0, 2)))


# ----------------------------------------------------------------------------------------- the grid

def test_grid_axes_arms_and_their_configs(tmp_path):
    axes = sweep.parse_grid(["gan.gan_weight=0.001,0.01", "optim.lr_generator=1e-4,2e-4,3e-4"])
    assert axes == [("gan.gan_weight", ["0.001", "0.01"]), ("optim.lr_generator", ["1e-4", "2e-4", "3e-4"])]
    assert sweep.parse_grid(["gan.gan_weight=0.001,0.01,optim.lr_generator=1e-4,2e-4,3e-4"]) == axes  # one flag
    arms = sweep.grid_arms(axes)
    assert len(arms) == 6 and arms[1].label == "gan.gan_weight=0.001,optim.lr_generator=2e-4"  # first axis outermost
    opts = load_config(sweep.SweepOptions, TINY, [
        "grid=[gan.gan_weight=0.001,0.01, optim.lr_generator=1e-4,2e-4,3e-4]", f"images={tmp_path / 'heldout'}",
        f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.registered_model=", "tracking.alias="])
    cfg = sweep.arm_config(opts, arms[1], parent_run_id="ab" * 16, tracking_uri="sqlite:///x.db")
    assert cfg.gan.gan_weight == 0.001 and cfg.optim.lr_generator == 2e-4 and cfg.model.cnum == 8
    assert cfg.name == "tiny-gan.gan_weight-0.001_optim.lr_generator-2e-4"
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs" / "tiny-abababab")
    assert cfg.tracking.registered_model == "tiny" and cfg.tracking.alias == "" and cfg.tracking.uri == "sqlite:///x.db"
    for bad, message in [([], "at least one axis"), (["0.1,0.2"], "must start with KEY=VALUE"),
                         (["gan.gan_weight=1", "gan.gan_weight=2"], "given twice"),
                         (["gan.gan_weight=1,1"], "a value twice"), (["tracking.alias=a,b"], "set by the sweep")]:
        with pytest.raises(ValueError, match=message):
            sweep.parse_grid(bad)


def test_bad_grid_keys_and_values_are_refused_up_front_with_exit_2(tmp_path, capsys):
    base = ["sweep", "--config", str(TINY), "--images", str(tmp_path)]
    assert main([*base, "--grid", "gan.bogus=1,2"]) == 2
    assert "grid arm gan.bogus=1: --set gan.bogus=1: unknown option 'bogus' in gan" in capsys.readouterr().err
    assert main([*base, "--grid", "gan.gan_weight=x,1"]) == 2
    assert "gan.gan_weight: expected a number, got 'x'" in capsys.readouterr().err
    assert main(["sweep", "--config", str(TINY), "--grid", "gan.gan_weight=1,2"]) == 2
    assert "images must name the held-out images" in capsys.readouterr().err


def test_how_many_arms_train_at_once(tmp_path):
    def arms(*sets):
        return [load_config(sweep.TrainConfig, TINY, list(sets)) for _ in range(4)]

    four_cpus = ClusterResources([{"CPU": 4.0}])
    # 2 workers x 1 CPU + 1 decode CPU (+ the trial) per arm: one at a time on 4 CPUs, three on 10
    assert sweep.arms_at_once(arms(), four_cpus)[0] == 1
    assert sweep.arms_at_once(arms(), ClusterResources([{"CPU": 10.0}]))[0] == 3
    assert sweep.arms_at_once(arms(), ClusterResources([{"CPU": 10.0}]), max_concurrent=2)[0] == 2
    assert sweep.arms_at_once(arms(), ClusterResources([{"CPU": 2.0}], max_total={"CPU": 64.0}))[0] == 4
    half = arms("scaling.num_workers=1", "scaling.cpus_per_worker=0.5")
    assert sweep.arms_at_once(half, four_cpus)[0] == 2
    count, why = sweep.arms_at_once(arms("scaling.num_workers=0"), ClusterResources([{"CPU": 64.0}]))
    assert count == 1 and "local mode" in why
    gpus = arms("scaling.num_workers=2", "scaling.use_gpu=true")
    assert sweep.arms_at_once(gpus, ClusterResources([{"CPU": 64.0, "GPU": 4.0}]))[0] == 2


# ----------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def sweep_shards(good_images_dir, tmp_path_factory):
    """A local shard folder: the 4 test photos under 2 keys each, 2 of the 8 in the val split."""
    import ray

    from pipeline.shards import prepare

    src = tmp_path_factory.mktemp("sweep_src")
    seed = split_seed(copied_photos(good_images_dir, src, 2), 0.25, 2)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False)
    dst = tmp_path_factory.mktemp("sweep_shards") / "shards"
    manifest = prepare(str(src), str(dst), val_fraction=0.25, min_size=64, seed=seed, progress=False)
    assert manifest["counts"] == {**manifest["counts"], "train": 6, "val": 2}
    return dst


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))


@pytest.fixture()
def mlflow_uri(tmp_path):
    """A fresh sqlite MLflow store; this process's tracking URI is restored afterwards (an arm trained in this
    process, scaling.num_workers=0, sets it)."""
    import mlflow

    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(None)


def _sweep_argv(tmp_path, shards, uri, *extra):
    return ["sweep", "--config", str(TINY), "--name", "sw", "--steps", "2",
            "--set", f"data.shards={shards}", "--set", f"checkpoint.storage_path={tmp_path / 'runs'}",
            "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=sweep-test", "--set", "batch_size=1",
            "--set", "val_every=2", "--set", "checkpoint.every=2", *extra]


@pytest.mark.slow
def test_a_2x2_sweep_puts_four_arms_under_one_parent_and_compares_them_in_one_report(
        ray_local, sweep_shards, good_images_dir, tmp_path, mlflow_uri, capsys):
    """The laptop path: scaling.num_workers=0 trains each arm in this process, one after another. The
    paper's grid, gan.loss x model.attention, with every other ablation switch on too (no spatial discount,
    no hole L1): each arm trains two steps, registers and is compared."""
    import mlflow

    out = tmp_path / "report"
    argv = _sweep_argv(tmp_path, sweep_shards, mlflow_uri, "--set", "scaling.num_workers=0",
                       "--set", "loss.spatial_discount=false", "--set", "gan.l1_weight=0",
                       "--grid", "gan.loss=dcgan,lsgan", "--grid", "model.attention=contextual,none",
                       "--images", str(good_images_dir), "--mask-preset", "box", "--output", str(out))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 at a time (scaling.num_workers=0" in printed
    assert re.search(r"own wall times add up to [\d.]+ s \([\d.]+x\)", printed)

    labels = [f"gan.loss={g},model.attention={a}" for g in ("dcgan", "lsgan") for a in ("contextual", "none")]
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    parents = [r for r in runs if r.data.tags.get("deepfill.job") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for key in ("train_wall_s", "arms_wall_s_sum", "concurrency", "sweep_wall_s", "eval_wall_s"):
        assert parent.data.metrics[key] > 0, key
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5
    assert sorted(r.data.tags["deepfill.arm"] for r in children) == sorted(labels)
    assert {r.info.status for r in children} == {"FINISHED"}
    assert len({r.data.tags["storage"] for r in children}) == 4  # a checkpoint folder each
    for r in children:
        assert "val_hole_l1" in r.data.metrics and "g_loss" in r.data.metrics and r.data.metrics["arm_wall_s"] > 0
        assert r.data.params["gan.loss"] in ("dcgan", "lsgan") and r.data.params["gan.l1_weight"] == "0.0"
        assert r.data.params["loss.spatial_discount"] == "False" and "d_adv" in r.data.metrics
    versions = client.search_model_versions("name = 'deepfill-tiny'")
    assert sorted(v.tags["deepfill.arm"] for v in versions) == sorted(labels)
    assert {v.tags["deepfill.sweep_run_id"] for v in versions} == {parent.info.run_id}

    result = json.loads((out / "metrics.json").read_text())
    rows = {m["label"]: m for m in result["methods"]}
    assert list(rows) == [*labels, "telea", "navier_stokes"]
    assert result["count"] == 4
    for method in result["mean"]:
        for metric in report.METRICS:
            lo, hi = result["ci95"][method][metric]
            assert lo <= result["mean"][method][metric] <= hi, (method, metric)
    md = (out / "report.md").read_text()
    for label in [*labels, "telea", "navier_stokes"]:
        lines = [line for line in md.splitlines() if line.startswith(f"| {label} |") and "%" in line]
        assert len(lines) == 2 and all(line.count("[") == 5 for line in lines)  # hole and whole-image tables
    grid = _png(out / "grid.png")
    assert grid.shape == (4 * 68 + 4, (1 + 4 + 2 + 4) * 68 + 4, 3)  # masked | 4 models | telea | truth | 4 maps
    curves = sorted(p.name for p in (out / "curves").iterdir())
    assert {"g_loss.png", "d_loss.png", "val_hole_l1.png", "val_hole_psnr.png"} <= set(curves)
    for name in curves:
        assert _png(out / "curves" / name).shape[2] == 3
    page = (out / "report.html").read_text()
    assert not re.search(r"\bhref\s*=", page) and "<script" not in page and "@import" not in page
    assert "url(" not in page and "<link" not in page
    sources = re.findall(r"\bsrc\s*=\s*\"([^\"]*)\"", page)
    assert len(sources) == 1 + len(curves) and all(s.startswith("data:image/png;base64,") for s in sources)
    for label in labels:
        assert label in page

    # the evaluate run: a child per model, tagged with the sweep; the versions link back to them
    evals = client.search_runs([client.get_experiment_by_name("deepfill-evaluate").experiment_id])
    top = [r for r in evals if r.data.tags.get("deepfill.job") == "evaluate"]
    assert len(top) == 1 and top[0].data.tags["deepfill.sweep_run_id"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).data.tags["deepfill.evaluate_run_id"] == top[0].info.run_id
    per_model = [r for r in evals if r.data.tags.get("mlflow.parentRunId") == top[0].info.run_id]
    assert len(per_model) == 4 and all("l1_hole.ci_low" in r.data.metrics for r in per_model)
    assert {v.tags["deepfill.eval.box"] for v in client.search_model_versions("name = 'deepfill-tiny'")} == \
        {r.info.run_id for r in per_model}
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


@pytest.mark.slow
def test_arms_train_at_once_as_tune_trials_where_the_cluster_holds_them(
        ray_local, sweep_shards, tmp_path, mlflow_uri, capsys):
    """The cluster path: 2 arms of 1 worker (0.5 CPU) + 1 data CPU fit twice in the 4 CPUs: Tune trials."""
    import mlflow

    argv = _sweep_argv(tmp_path, sweep_shards, mlflow_uri, "--steps", "1", "--set", "val_every=0",
                       "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=0.5",
                       "--grid", "optim.lr_generator=1e-4,2e-4", "--no-report")
    assert main(argv) == 0
    assert "2 arm(s), 2 at a time (the cluster (4 CPU) holds 2 arm(s)" in capsys.readouterr().out
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("deepfill.job") == "sweep")
    assert parent.data.metrics["arms_at_once"] == 2
    concurrency = parent.data.metrics["concurrency"]  # the arms' own wall times added up / the sweep's
    assert concurrency > 1.0
    with capsys.disabled():
        print(f"\nTune sweep: {parent.data.metrics['train_wall_s']:.1f} s wall for arms of "
              f"{parent.data.metrics['arms_wall_s_sum']:.1f} s in all ({concurrency:.2f}x)")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert spans[1][0] < spans[0][1]  # the two arms' runs overlapped in time
    versions = client.search_model_versions("name = 'deepfill-tiny'")
    assert sorted(v.tags["deepfill.arm"] for v in versions) == ["optim.lr_generator=1e-4", "optim.lr_generator=2e-4"]
    assert (tmp_path / "runs" / f"sw-{parent.info.run_id[:8]}" / "tune").is_dir()  # Tune's own record
