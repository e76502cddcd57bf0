"""``deepfill serve`` (jobs.serve): a real Ray Serve app on local Ray, called over HTTP.

The shared app (``serve_app`` in conftest: a tiny cnum-8 generator file) covers the API; one more app on the
same Serve instance (route prefix ``/alias``) serves ``models:/<name>@live`` from an MLflow SQLite registry in
a tmp dir and follows the alias (``POST /reload`` and polling). The pure parts (request parsing, the batch's
forward passes, the options, the app builder) are tested without Serve.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import models
import models.checkpoint
from jobs import serve as S
from tests.imaging import BAD, EXTREME, HOSTILE, png_bomb, write_bad_images, write_hostile_images


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def picture(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def box_mask(h: int, w: int) -> np.ndarray:
    """uint8 (h, w): 255 in a box in the middle (the hole), 0 elsewhere."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: h // 2 + 1, w // 4: w // 2 + 1] = 255
    return mask


def decoded(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def post(url: str, image: bytes, mask: bytes, query: str = "") -> requests.Response:
    return requests.post(f"{url}/inpaint{query}", files={"image": ("i.png", image), "mask": ("m.png", mask)},
                         timeout=60)


def check_filled(out: np.ndarray, image: np.ndarray, mask: np.ndarray) -> None:
    assert out.shape == image.shape
    known = mask == 0
    assert np.array_equal(out[known], image[known])  # known pixels identical
    assert not np.array_equal(out[~known], image[~known])  # the hole was painted


def tiny_generator(seed: int):
    torch.manual_seed(seed)
    return models.InpaintGenerator(cnum=8)


# ----------------------------------------------------------------------------------------- the shared app


def test_round_trip_multipart(serve_app):
    image, mask = picture(0, 37, 53), box_mask(37, 53)
    r = post(serve_app, png(image), png(mask))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = decoded(r.content)
    check_filled(out, image, mask)
    # the one inference path: the same pixels as models.inpaint_uint8 here (up to float summation order)
    local = models.inpaint_uint8(models.for_inference(tiny_generator(0)), image[None], (mask > 0)[None, ..., None])[0]
    assert np.abs(out.astype(int) - local).mean() < 1.0


def test_round_trip_json_base64_and_rgba_strokes(serve_app):
    image = picture(1, 40, 48)
    strokes = np.zeros((40, 48, 4), np.uint8)  # white strokes on a transparent canvas, as a page draws them
    strokes[5:15, 6:30] = (255, 255, 255, 255)
    strokes[20:, :, :3] = 255  # white but fully transparent: not a hole
    hole = strokes[..., 3] > 0
    body = {"image": base64.b64encode(png(image)).decode(),
            "mask": "data:image/png;base64," + base64.b64encode(png(strokes)).decode()}  # canvas.toDataURL()
    r = requests.post(serve_app + "/inpaint", json=body, timeout=60)
    assert r.status_code == 200, r.text
    check_filled(decoded(r.content), image, hole.astype(np.uint8))


def test_attention(serve_app):
    image, mask = picture(2, 45, 61), box_mask(45, 61)
    r = post(serve_app, png(image), png(mask), "?attention=1")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    assert (data["width"], data["height"]) == (61, 45) and data["seconds"] > 0
    check_filled(decoded(base64.b64decode(data["image"])), image, mask)
    attention = decoded(base64.b64decode(data["attention"]))
    assert attention.shape == image.shape
    assert attention[:8, :8].std(axis=(0, 1)).max() == 0  # one offset per 8x8 cell


def test_health_model_page_and_routes(serve_app):
    r = requests.get(serve_app + "/healthz", timeout=10)
    assert (r.status_code, r.text) == (200, "ok")
    info = requests.get(serve_app + "/model", timeout=10).json()
    assert info["cnum"] == 8 and info["step"] == 3 and len(info["sha256"]) == 64
    assert info["provenance"] == {"source": "tests/conftest.py serve_app"}
    assert info["ref"].endswith("generator.pt") and info["version"] is None and info["max_batch_size"] == 8
    page = requests.get(serve_app + "/", timeout=10)
    if S.PAGE_PATH.exists():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.content == S.PAGE_PATH.read_bytes()
    else:
        assert page.status_code == 404 and page.json()["reason"] == "no_page"
    assert requests.get(serve_app + "/nowhere", timeout=10).json()["reason"] == "not_found"
    r = requests.get(serve_app + "/inpaint", timeout=10)
    assert (r.status_code, r.json()["reason"]) == (405, "method_not_allowed")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bad")
    write_bad_images(root)
    write_hostile_images(root)
    return root


IMAGE_CASES = {  # file under bad_files -> reason for it as the image (as the mask: mask_ + reason)
    BAD["empty"]: "empty", BAD["not_image"]: "not_an_image", BAD["truncated"]: "truncated",
    BAD["corrupt"]: "corrupt", BAD["bomb"]: "decompression_bomb",
    **{key: reason for key, reason in HOSTILE.values()},
}


@pytest.mark.parametrize("key", sorted(IMAGE_CASES))
def test_bad_image_and_bad_mask(serve_app, bad_files, key):
    data, reason = (bad_files / key).read_bytes(), IMAGE_CASES[key]
    status = 413 if "bomb" in reason else 422
    good = picture(3, 256, 256)
    r = post(serve_app, data, png(box_mask(256, 256)))
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert r.json()["detail"]
    r = post(serve_app, png(good), data)
    assert (r.status_code, r.json()["reason"]) == (status, "mask_" + reason), r.text


def test_refusals(serve_app):
    image = png(picture(4, 32, 32))
    mask = png(box_mask(32, 32))
    cases = [
        (dict(files={"image": ("i.png", image)}), 400, "missing_field"),
        (dict(json={"mask": base64.b64encode(mask).decode()}), 400, "missing_field"),
        (dict(data=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json"),
        (dict(json=[1, 2]), 400, "bad_json"),
        (dict(json={"image": 7, "mask": "AAAA"}), 400, "bad_json"),
        (dict(json={"image": "!!not base64!!", "mask": "AAAA"}), 400, "bad_base64"),
        (dict(data=b"--x\r\nno headers--", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
         "bad_multipart"),
        (dict(data=image, headers={"content-type": "image/png"}), 415, "unsupported_content_type"),
        (dict(files={"image": ("i.png", image), "mask": ("m.png", png(box_mask(32, 33)))}), 422,
         "mask_size_mismatch"),
        (dict(files={"image": ("i.png", image), "mask": ("m.png", png(np.zeros((32, 32), np.uint8)))}), 422,
         "no_hole"),
        (dict(files={"image": ("i.png", png_bomb(1100, 1000)), "mask": ("m.png", mask)}), 413,
         "decompression_bomb"),  # over the app's --max-pixels (1024^2), not a real bomb
        (dict(files={"image": ("i.png", bytes(3 * 2**20)), "mask": ("m.png", mask)}), 413, "too_large"),
    ]
    for kwargs, status, reason in cases:
        r = requests.post(serve_app + "/inpaint", timeout=60, **kwargs)
        assert (r.status_code, r.json()["reason"]) == (status, reason), (reason, r.text)
    # a chunked body (no Content-Length) is refused once what was read passes --max-bytes
    r = requests.post(serve_app + "/inpaint", data=iter([b"x" * 1024] * 3000), timeout=60,
                      headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["reason"]) == (413, "too_large")


@pytest.mark.parametrize("kind", ["dot", "tall", "wide"])
def test_extreme_shapes_are_served(serve_app, bad_files, kind):
    data = (bad_files / EXTREME[kind]).read_bytes()
    w, h = Image.open(io.BytesIO(data)).size
    r = post(serve_app, data, png(np.full((h, w), 255, np.uint8)))
    assert r.status_code == 200, r.text
    assert decoded(r.content).shape == (h, w, 3)


def test_concurrent_clients_are_batched_and_each_gets_its_own_picture(serve_app):
    before = requests.get(serve_app + "/model", timeout=10).json()["stats"]
    sizes = [(40, 40), (40, 40), (40, 40), (32, 56), (40, 40), (32, 56), (40, 40), (32, 56)]
    inputs = [(picture(10 + i, h, w), box_mask(h, w)) for i, (h, w) in enumerate(sizes)]
    results: list = [None] * len(inputs)
    barrier = threading.Barrier(len(inputs))

    def client(i):
        image, mask = inputs[i]
        barrier.wait()
        results[i] = post(serve_app, png(image), png(mask))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (image, mask), r in zip(inputs, results):
        assert r.status_code == 200, r.text
        check_filled(decoded(r.content), image, mask)
    stats = requests.get(serve_app + "/model", timeout=10).json()["stats"]
    assert stats["requests"] - before["requests"] == len(inputs)
    assert stats["largest_batch"] >= 2  # concurrent requests shared a batch
    assert stats["batches"] - before["batches"] < len(inputs)


# ----------------------------------------------------------------------------------------- the alias


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """An MLflow SQLite registry in tmp_path with ``tiny@live`` -> version 1 (generator seed 0)."""
    import mlflow

    from jobs.serving import log_inpaint_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve", artifact_location=str(tmp_path / "art")))

    def register(seed: int, alias: str | None = "live") -> str:
        path = tmp_path / f"generator-{seed}.pt"
        models.checkpoint.save_generator(str(path), tiny_generator(seed), step=seed)
        with mlflow.start_run():
            info = log_inpaint_model(str(path), registered_model_name="tiny", alias=alias)
        return str(info.registered_model_version)

    register(0)
    yield uri, register
    mlflow.set_tracking_uri(None)


def _wait_for_version(url: str, version: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = requests.get(url + "/model", timeout=10).json()
        if info["version"] == version or time.monotonic() > deadline:
            return info
        time.sleep(0.25)


def test_follows_the_alias_by_reload_and_by_polling(serve_app, registry):
    from mlflow import MlflowClient
    from ray import serve

    uri, register = registry
    opts = S.ServeOptions(model="models:/tiny@live", tracking_uri=uri, num_cpus_per_replica=0.25, poll_s=0.5)
    serve.run(S.build_app(opts), name="deepfill-alias", route_prefix="/alias", blocking=False)
    url = serve_app + "/alias"
    try:
        info = requests.get(url + "/model", timeout=10).json()
        assert (info["name"], info["version"], info["alias"], info["step"]) == ("tiny", "1", "live", 0)
        image, mask = picture(5, 24, 24), box_mask(24, 24)
        r = post(url, png(image), png(mask))
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        first = decoded(r.content)

        v2 = register(1)  # version 2 with other weights moves the alias
        assert v2 == "2"
        r = requests.post(url + "/reload", timeout=60)
        assert r.status_code == 200, r.text
        if r.json()["changed"] is False:  # the poller may have swapped it in first
            assert r.json()["model"]["version"] == "2"
        info = requests.get(url + "/model", timeout=10).json()
        assert (info["version"], info["step"]) == ("2", 1)
        r = post(url, png(image), png(mask))
        assert r.headers["x-model-version"] == "2"
        assert not np.array_equal(decoded(r.content), first)  # other weights, other pixels

        MlflowClient().set_registered_model_alias("tiny", "live", "1")  # back to 1: polling follows it
        assert _wait_for_version(url, "1", timeout=20)["version"] == "1"
        assert requests.post(url + "/reload", timeout=60).json()["changed"] is False
    finally:
        serve.delete("deepfill-alias")


# ----------------------------------------------------------------------------------------- pure parts


def test_parse_multipart_and_fields():
    body = (b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nIMG\r\nBYTES\r\n--XyZ\r\ncontent-disposition: form-data; name=mask\r\n"
            b"\r\n\r\n--XyZ--\r\n")
    assert S.parse_multipart(body, 'multipart/form-data; boundary="XyZ"') == {"image": b"IMG\r\nBYTES", "mask": b""}
    with pytest.raises(S.Refused) as err:
        S.parse_multipart(body.replace(b"--XyZ--", b"--XyZ"), "multipart/form-data; boundary=XyZ")
    assert err.value.reason == "bad_multipart"
    with pytest.raises(S.Refused) as err:
        S.parse_fields(b"", "multipart/form-data")
    assert err.value.reason == "bad_multipart"
    image, mask = S.parse_fields(json.dumps({"image": "aGk=", "mask": "data:;base64,aG8="}).encode(),
                                 "application/json; charset=utf-8")
    assert (image, mask) == (b"hi", b"ho")


def test_inpaint_jobs_groups_by_size_under_the_pixel_cap(one_torch_thread):
    generator = models.for_inference(tiny_generator(0))
    jobs = [S.Job(picture(i, h, w), (box_mask(h, w) > 0).astype(np.uint8), attention=(i == 4))
            for i, (h, w) in enumerate([(16, 16), (16, 24), (16, 16), (16, 16), (16, 16)])]
    out, passes = S.inpaint_jobs(generator, jobs, max_batch_pixels=2 * 16 * 16)
    # 16x16 without attention: 3 images, 2 per pass -> 2 passes; 16x24: 1; 16x16 with attention: 1
    assert passes == 4
    for job, (result, attention) in zip(jobs, out):
        alone = models.inpaint_uint8(generator, job.image[None], job.mask[None])[0]
        assert np.array_equal(result, alone)
        assert (attention is not None) == job.attention
    assert out[4][1].shape == (16, 16, 3)


def test_options_and_app_builder():
    from ray.serve.config import AutoscalingConfig

    from jobs.cli import parse

    _, module, opts = parse(["serve", "--model", "models:/m@a", "--autoscale", "1,3", "--no-batching", "--port",
                             "8123", "--max-bytes", "8MB"])
    assert module is S and opts.autoscale == [1, 3] and opts.batch_size == 1 and opts.max_bytes_limit == 8 * 2**20
    for bad in (dict(num_replicas=2, autoscale=[1, 2]), dict(autoscale=[3, 1]), dict(max_batch_size=0),
                dict(port=0), dict(max_bytes="lots"), dict(poll_s=-1), dict(route_prefix="api")):
        with pytest.raises(ValueError):
            S.ServeOptions(model="x.pt", **bad)
    app = S.app_builder({"model": "models:/m@a", "autoscale": [1, 3], "max_batch_size": 4})
    deployment = app._bound_deployment
    assert deployment.name == S.DEPLOYMENT_NAME and deployment.max_ongoing_requests == 16
    assert isinstance(deployment._deployment_config.autoscaling_config, AutoscalingConfig)
    with pytest.raises(ValueError, match="unknown|valid"):
        S.app_builder({"model": "m.pt", "replicas": 2})
