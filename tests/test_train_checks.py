"""What `deepfill train` refuses before it starts, and the watchdog that ends a stalled data stream.

The cluster check is a pure function of (cluster resources, options), tested directly; one CLI test runs it
against the real local Ray of the ``ray_local`` fixture (4 logical CPUs). Nothing here trains.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from jobs import cli
from jobs import train as T
from jobs.options import load_config
from pipeline.config import DataConfig
from pipeline.datasets import StreamStalled, stall_message, watch_stream

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _cfg(*sets):
    return load_config(T.TrainConfig, TINY, ["data.shards=/shards", *sets])


def _fake_shards(tmp_path, train=10):
    """A folder whose manifest.json says it holds ``train`` training images (all the up-front check reads)."""
    root = tmp_path / "shards"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"counts": {"train": train, "val": 0}}))
    return str(root)


# ----------------------------------------------------------------------------------------- the cluster check

def test_workers_that_take_every_cpu_leave_the_data_pipeline_nothing_and_are_refused_with_the_numbers():
    # the case: `ray start --head --num-cpus=2`, 2 workers x 1 CPU, decode tasks (tiny.yaml)
    problem = T.check_cluster(_cfg(), T.ClusterResources([{"CPU": 2.0, "memory": 1e9}]))
    assert problem == (
        "the cluster cannot hold this job: it has 2 CPU; the 2 training worker(s) reserve 2 CPU "
        "(scaling.num_workers=2 x scaling.cpus_per_worker=1), and the data pipeline needs 1 CPU more "
        "(data.decode_pool=tasks: one decode task at a time): 3 CPU in all. Add CPU to the cluster "
        "(ray start --num-cpus=N), or lower scaling.num_workers, scaling.cpus_per_worker (fractions work, "
        "e.g. 0.5); scaling.check_resources=false skips this check (for resources that join by other means)")
    assert T.check_cluster(_cfg(), T.ClusterResources([{"CPU": 3.0}])) is None
    assert T.check_cluster(_cfg("scaling.cpus_per_worker=0.5"), T.ClusterResources([{"CPU": 2.0}])) is None
    assert T.check_cluster(_cfg("scaling.num_workers=0"), T.ClusterResources([{"CPU": 1.0}])) is None  # driver loop


def test_the_data_pipeline_needs_one_cpu_per_actor_of_a_fixed_pool():
    cfg = _cfg("data.decode_pool=actors", "data.decode_workers=3")
    problem = T.check_cluster(cfg, T.ClusterResources([{"CPU": 2.0}, {"CPU": 2.0}]))
    assert "it has 4 CPU" in problem and "data pipeline needs 3 CPU more" in problem and "5 CPU in all" in problem
    assert "data.decode_workers=3 decode actors of 1 CPU" in problem
    assert "lower scaling.num_workers, scaling.cpus_per_worker (fractions work, e.g. 0.5), data.decode_workers;" in problem
    assert T.check_cluster(cfg, T.ClusterResources([{"CPU": 3.0}, {"CPU": 2.0}])) is None
    autoscaled = _cfg("data.decode_pool=actors", "data.decode_workers=0")  # starts at one actor
    assert T.check_cluster(autoscaled, T.ClusterResources([{"CPU": 3.0}])) is None


def test_gpus_and_custom_resources_are_counted_per_worker():
    cfg = _cfg("scaling.use_gpu=true", "scaling.num_workers=4", "scaling.custom_resources={trainer: 1}")
    problem = T.check_cluster(cfg, T.ClusterResources([{"CPU": 16.0, "GPU": 2.0, "trainer": 4.0}]))
    assert "it has 16 CPU, 4 trainer, 2 GPU" in problem and "reserve 4 CPU, 4 trainer, 4 GPU" in problem
    assert "Add GPU to the cluster, or lower scaling.num_workers, scaling.gpus_per_worker;" in problem
    problem = T.check_cluster(cfg, T.ClusterResources([{"CPU": 16.0, "GPU": 4.0, "trainer": 1.0}]))
    assert "scaling.custom_resources.trainer" in problem


def test_the_nodes_must_take_the_workers_under_the_placement_strategy():
    two_nodes = T.ClusterResources([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    gpu = ["scaling.use_gpu=true"]
    assert T.check_cluster(_cfg(*gpu), two_nodes) is None  # PACK is soft: one worker per node will do
    problem = T.check_cluster(_cfg(*gpu, "scaling.placement_strategy=STRICT_PACK"), two_nodes)
    assert problem.startswith("the cluster's nodes cannot take 2 training worker(s) of 1 CPU, 1 GPU each "
                              "(scaling.placement_strategy=STRICT_PACK): its nodes have 8 CPU, 1 GPU; 8 CPU, 1 GPU.")
    one_node = T.ClusterResources([{"CPU": 8.0}])
    assert "STRICT_SPREAD" in T.check_cluster(_cfg("scaling.placement_strategy=STRICT_SPREAD"), one_node)
    big_worker = _cfg("scaling.cpus_per_worker=3")  # 6 CPUs in all, but no node takes 3
    assert "cannot take 2 training worker(s) of 3 CPU" in T.check_cluster(
        big_worker, T.ClusterResources([{"CPU": 2.0}] * 4))


def test_an_autoscaling_cluster_is_measured_by_its_maximum():
    small_now = [{"CPU": 2.0}]
    assert T.check_cluster(_cfg(), T.ClusterResources(small_now, max_total={"CPU": 64.0})) is None
    problem = T.check_cluster(_cfg(), T.ClusterResources(small_now, max_total={"CPU": 2.0}))
    assert "it can grow to at most (its autoscaler's maximum) 2 CPU" in problem
    assert "Let the autoscaler add more CPU" in problem
    gpu = _cfg("scaling.use_gpu=true")  # a GPU node type missing from the autoscaler's config
    assert "GPU" in T.check_cluster(gpu, T.ClusterResources(small_now, max_total={"CPU": 64.0}))


def test_the_cli_refuses_a_job_the_local_cluster_cannot_hold(ray_local, tmp_path, capsys):
    """On the real 4-CPU test cluster: 4 workers x 1 CPU leave the decode tasks nothing; exit 2, one line."""
    shards = _fake_shards(tmp_path, train=100)
    argv = ["train", "--config", TINY, "--set", f"data.shards={shards}", "--set", "scaling.num_workers=4",
            "--set", f"checkpoint.storage_path={tmp_path / 'runs'}"]
    assert T.cluster_resources().max_total is None  # a local cluster has no autoscaler
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "deepfill train: the cluster cannot hold this job: it has 4 CPU; the 4 training worker(s) reserve 4 CPU")
    assert not (tmp_path / "runs").exists()  # refused before Ray Train started anything


# ----------------------------------------------------------------------------------------- data.shards

def test_train_without_data_shards_is_refused_by_name(capsys):
    assert cli.main(["train", "--config", TINY]) == 2  # tiny.yaml leaves data.shards empty
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepfill train: missing option data.shards: ")
    assert "manifest" not in err and "Traceback" not in err


def test_shards_without_a_manifest_or_with_too_few_images_are_refused(tmp_path, capsys):
    assert cli.main(["train", "--config", TINY, "--set", f"data.shards={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deepfill train: data.shards: cannot read {tmp_path / 'nothing' / 'manifest.json'}")
    assert "deepfill prepare" in err and err.count("\n") == 1
    shards = _fake_shards(tmp_path, train=3)  # 2 workers x batch 2 need 4
    assert cli.main(["train", "--config", TINY, "--set", f"data.shards={shards}"]) == 2
    assert "data.shards holds 3 training image(s), fewer than one batch per worker (batch_size=2 x " \
           "scaling.num_workers=2 = 4)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the watchdog

def _slow(items, pause_after, pause_s):
    """Yield ``items``, sleeping ``pause_s`` before item number ``pause_after``."""
    for i, item in enumerate(items):
        if i == pause_after:
            time.sleep(pause_s)
        yield item


def test_a_stream_that_stops_yielding_fails_with_the_message_after_its_timeout():
    stream = watch_stream(_slow(range(5), pause_after=2, pause_s=3.0), 0.5, "no batch (data.stall_timeout_s)")
    got, start = [next(stream), next(stream)], time.perf_counter()
    with pytest.raises(StreamStalled, match=r"^no batch \(data.stall_timeout_s\)$"):
        next(stream)
    assert got == [0, 1] and 0.4 < time.perf_counter() - start < 2.0


def test_a_slow_consumer_and_a_slow_but_steady_stream_do_not_trip_the_watchdog():
    stream = watch_stream(_slow(range(3), pause_after=1, pause_s=0.2), 0.3, "stalled")
    got = []
    for item in stream:
        got.append(item)
        time.sleep(0.4)  # longer than the timeout: the next item waits ready, one ahead
    assert got == [0, 1, 2]


def test_the_watched_stream_passes_errors_and_its_end_through():
    def failing():
        yield 1
        raise RuntimeError("the training dataset yields no full batch")

    stream = watch_stream(failing(), 5.0, "stalled")
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="no full batch"):
        next(stream)
    assert list(watch_stream(iter([1, 2]), 5.0, "stalled")) == [1, 2]
    assert list(watch_stream(iter([1, 2]), 0, "stalled")) == [1, 2]  # 0 = off: a plain pass-through
    before = threading.active_count()
    stream = watch_stream(iter(range(100)), 5.0, "stalled")
    next(stream)
    stream.close()  # the pump thread stops at its next item
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_the_stall_message_names_the_option_the_shards_and_what_to_check():
    data = DataConfig(shards="s3://bucket/shards", decode_pool="actors", decode_workers=2)
    text = stall_message(data, 600)
    assert text.startswith("no training batch for 600 s (data.stall_timeout_s) from s3://bucket/shards/train")
    assert "data.decode_workers=2: 2 CPU(s)" in text and "data.storage" in text and "0 = wait forever" in text


# ----------------------------------------------------------------------------------------- init.*

def test_init_weights_that_cannot_load_are_refused_before_anything_starts(tmp_path, capsys):
    """A missing file and a generator of another width: exit 2 with one line, nothing written."""
    import models
    import models.checkpoint

    shards = _fake_shards(tmp_path, train=100)
    base = ["train", "--config", TINY, "--set", f"data.shards={shards}",
            "--set", f"checkpoint.storage_path={tmp_path / 'runs'}"]
    assert cli.main([*base, "--set", f"init.generator={tmp_path / 'nowhere.pt'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepfill train: ") and "nowhere.pt" in err, err
    wide = tmp_path / "wide.pt"
    models.checkpoint.save_generator(str(wide), models.InpaintGenerator(cnum=4), step=1)
    assert cli.main([*base, "--set", f"init.generator={wide}"]) == 2  # tiny.yaml has model.cnum 8
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cnum 4" in err and "model.cnum is 8" in err, err
    assert not (tmp_path / "runs").exists()
