"""The GPU figures of the bf16 path, in one run of under 5 minutes: prints one JSON object and writes it to --out.

    python3 benchmarks/gpu.py --out gpu.json            # on a node with CUDA GPUs (made for an H200 and 16 CPUs)
    python3 benchmarks/gpu.py --smoke --out smoke.json  # the same code on this CPU, tiny sizes (a check)

Sections (``--sections``, default all), each with its own time budget, each caught: a section that fails
records ``{"error": ...}`` and the next one runs; the JSON is rewritten to --out after every section, and a
watchdog writes what is there and exits when the whole run reaches ``--time-limit``.

- ``train``: one GPU, the real networks (generator cnum 32, critics cnum 64) at 256x256, batch 16, synthetic
  data already on the GPU: iterations of ``n_critic`` (``--n-critic``, default 5 as ``gan.n_critic``)
  ``models.gan.critic_step`` + one ``generator_step`` (Adam, the trainer's betas), float32 then bf16
  (``amp_dtype=torch.bfloat16``, what the trainer runs on CUDA with ``optim.bf16``). Each step is timed
  alone (synchronised); medians over the repeats after warm-up iterations. images/s of an iteration
  ((n_critic + 1) * batch images, each step a fresh batch), and for n_critic 1 from the same step medians;
  peak memory (``torch.cuda.max_memory_allocated``) per dtype; bf16 / float32 speedups side by side.
  Float32 is PyTorch's default: convolutions may use TF32 (``cudnn.allow_tf32``), matmuls do not.
- ``ddp``: the same bf16 iteration under DistributedDataParallel on every GPU of the node (one process per
  GPU, ``torch.multiprocessing`` spawn, NCCL; generator and both critics wrapped, as
  ``ray.train.torch.prepare_model`` does): images/s per GPU and in total, and the scaling against ``train``.
  On one GPU the scaling is skipped, with the reason, and the same code runs at world size 1 as a check that
  NCCL + DDP run the step there. ``--smoke`` runs it on 2 CPU processes with gloo.
- ``infer``: ``models.inpaint`` (the one inference path: reflect-padding, ``holes_only`` attention, composite)
  of one 512, 1024 and 2048 px square image with a box and a stripe hole, the generator prepared by
  ``models.for_inference`` (eval, channels_last) with random weights; float32 and inside
  ``torch.autocast(dtype=torch.bfloat16)``: median latency, peak memory, and the bf16 composite against the
  float32 one (known pixels identical, hole pixels' largest difference).
- ``data``: the share of a training iteration spent waiting for data with a real CPU data path: a torch
  DataLoader whose workers run ``pipeline.datasets.make_sample`` (decode + augment + mask + loss weights) on
  synthetic ~512 px JPEG bytes, batches turned into model tensors as ``jobs.trainer.to_model_batch`` does;
  the loader's own images/s, then bf16 iterations fed by it: wait / (wait + step) as the trainer's
  ``data_wait_share``. Without albumentations or simplejpeg (not in the GPU image unless carried as wheels)
  the workers fall back to cv2 decode + crop + flip + the pipeline's masks and weights, and say so.

Times in seconds, memory in GiB, medians over the repeats. Only torch, numpy, cv2 and PIL are needed beyond
the project (and albumentations + simplejpeg for the real data path).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

# run as a script, this folder comes first on sys.path, and its sibling benchmark files (e.g. pipeline.py)
# would shadow the project's packages of the same name
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from models.gan import critic_step, generator_step  # noqa: E402

GIB = 2**30


@dataclass
class Config:
    """Sizes and budgets of one run (``gpu()``, or ``cpu_smoke()`` for --smoke)."""

    smoke: bool = False
    size: int = 256  # training crop side
    batch: int = 16  # training batch per GPU
    cnum: int = 32  # generator width (the reference's)
    critic_cnum: int = 64  # critics' width (the reference's)
    n_critic: int = 5  # critic steps per generator step
    warmup: int = 2  # untimed iterations first (cuDNN's kernel choice, the allocator's pools)
    repeats: int = 15  # timed iterations at most (fewer when the section's budget runs out)
    infer_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    infer_repeats: int = 3
    data_images: int = 64  # distinct JPEGs the data path cycles through
    data_jpeg_side: int = 512
    data_workers: int = 8  # DataLoader workers (the pipeline's decode actors take one CPU each)
    data_iterations: int = 4  # timed iterations fed by the loader
    budgets: dict = field(default_factory=lambda: {"train": 80.0, "ddp": 70.0, "infer": 70.0, "data": 50.0})
    time_limit: float = 290.0  # the watchdog's limit for the whole run

    @classmethod
    def gpu(cls) -> Config:
        return cls(data_workers=max(1, min(8, (os.cpu_count() or 2) - 4)))

    @classmethod
    def cpu_smoke(cls) -> Config:
        # 36 px: not a multiple of 8, so inference pads and crops
        return cls(smoke=True, size=32, batch=2, cnum=4, critic_cnum=4, n_critic=1, warmup=1, repeats=1,
                   infer_sizes=[32, 36], infer_repeats=1, data_images=4, data_jpeg_side=64, data_workers=1,
                   data_iterations=1, budgets={"train": 60.0, "ddp": 60.0, "infer": 30.0, "data": 60.0},
                   time_limit=280.0)


# ------------------------------------------------------------------------------------------------ helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 5) if xs else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def _build(cfg: Config, device: torch.device, seed: int = 0):
    """Generator, local critic (on size/2 crops), global critic, Adam for each side (the trainer's)."""
    torch.manual_seed(seed)
    gen = models.InpaintGenerator(cnum=cfg.cnum).to(device)
    local = models.local_critic(cfg.critic_cnum, cfg.size // 2).to(device)
    glob = models.global_critic(cfg.critic_cnum, cfg.size).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(list(local.parameters()) + list(glob.parameters()), lr=1e-4, betas=(0.5, 0.9))
    return (gen, local, glob), (opt_g, opt_d)


def _synthetic_batches(cfg: Config, n: int, device: torch.device, seed: int = 0):
    """n batches on device: smooth pictures (B,3,S,S) in [-1,1], one box hole of 3/8 to 1/2 of the side per
    sample (B,1,S,S) 1 = hole, and their discount weights (B,1,S,S)."""
    g = torch.Generator().manual_seed(seed)
    S, B = cfg.size, cfg.batch
    out = []
    for _ in range(n):
        low = torch.rand(B, 3, max(2, S // 16), max(2, S // 16), generator=g) * 2 - 1
        image = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)
        mask = torch.zeros(B, 1, S, S)
        for i in range(B):
            h, w = (int(v) for v in torch.randint(3 * S // 8, S // 2 + 1, (2,), generator=g))
            y, x = (int(v) for v in torch.randint(0, S - S // 2 + 1, (2,), generator=g))
            mask[i, :, y:y + h, x:x + w] = 1
        out.append((image.to(device), mask.to(device), models.losses.spatial_discount(mask).to(device)))
    return out


def _iteration(nets, opts, batches, cfg: Config, amp_dtype, device, times: dict | None = None) -> dict:
    """n_critic critic steps + one generator step, each on its own batch; each step's seconds appended to
    times["critic"] / times["generator"] when given. Returns the last metrics of both."""
    opt_g, opt_d = opts
    metrics = {}
    for image, mask, _ in batches[:cfg.n_critic]:
        _sync(device)
        t = time.perf_counter()
        metrics.update(critic_step(*nets, opt_d, image, mask, local_size=cfg.size // 2, amp_dtype=amp_dtype))
        _sync(device)
        if times is not None:
            times["critic"].append(time.perf_counter() - t)
    image, mask, weight = batches[cfg.n_critic]
    _sync(device)
    t = time.perf_counter()
    metrics.update(generator_step(*nets, opt_g, image, mask, weight, local_size=cfg.size // 2,
                                  amp_dtype=amp_dtype))
    _sync(device)
    if times is not None:
        times["generator"].append(time.perf_counter() - t)
    return metrics


def _step_figures(cfg: Config, times: dict, its: list[float]) -> dict:
    c, g, it = _median(times["critic"]), _median(times["generator"]), _median(its)
    out = {"critic_step_s": c, "generator_step_s": g, "iteration_s": it, "timed_iterations": len(its)}
    if it:
        out["images_per_s"] = round((cfg.n_critic + 1) * cfg.batch / it, 2)
    if c and g:
        out["images_per_s_n_critic_1"] = round(2 * cfg.batch / (c + g), 2)
    return out


# ------------------------------------------------------------------------------------------------ (a) train

def bench_train(cfg: Config, device: torch.device, deadline: float) -> dict:
    out = {"size": cfg.size, "batch": cfg.batch, "cnum": cfg.cnum, "critic_cnum": cfg.critic_cnum,
           "n_critic": cfg.n_critic, "local_size": cfg.size // 2,
           "images_per_iteration": (cfg.n_critic + 1) * cfg.batch,
           "data": "synthetic batches already on the device", "optimizer": "Adam lr 1e-4 betas (0.5, 0.9)"}
    batches = _synthetic_batches(cfg, cfg.n_critic + 1, device)
    variants = (("float32", None), ("bf16", torch.bfloat16))
    for k, (name, dt) in enumerate(variants):
        # each variant gets its share of what is left of the budget
        until = time.perf_counter() + (deadline - time.perf_counter()) / (len(variants) - k)
        nets = opts = None
        try:
            _reset_peak(device)
            nets, opts = _build(cfg, device)
            for _ in range(cfg.warmup):
                _iteration(nets, opts, batches, cfg, dt, device)
            times, its = {"critic": [], "generator": []}, []
            metrics = {}
            while len(its) < cfg.repeats and (not its or time.perf_counter() + its[-1] < until):
                t = time.perf_counter()
                metrics = _iteration(nets, opts, batches, cfg, dt, device, times)
                its.append(time.perf_counter() - t)
            res = _step_figures(cfg, times, its)
            res["peak_memory_gib"] = _peak_gib(device)
            res["losses_finite"] = all(math.isfinite(v) for v in metrics.values())
            res["last_metrics"] = {key: round(v, 5) for key, v in metrics.items()}
            out[name] = res
        except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the other's figures
            out[name] = _error(err)
        finally:
            nets = opts = None  # free the variant's networks and optimiser states before the next one
    f32, b16 = out.get("float32", {}), out.get("bf16", {})
    out["bf16_vs_float32"] = {
        "iteration_speedup": _ratio(f32.get("iteration_s"), b16.get("iteration_s")),
        "critic_step_speedup": _ratio(f32.get("critic_step_s"), b16.get("critic_step_s")),
        "generator_step_speedup": _ratio(f32.get("generator_step_s"), b16.get("generator_step_s")),
        "peak_memory_ratio": _ratio(b16.get("peak_memory_gib"), f32.get("peak_memory_gib")),
    }
    return out


# ------------------------------------------------------------------------------------------------ (b) ddp

_CHILDREN: list = []  # processes this run started (the watchdog ends them)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, cfg_dict: dict, result_path: str, backend: str, port: int,
                until_wall: float) -> None:
    """One DDP rank: the bf16 iteration on its own synthetic batches; rank 0 writes every rank's times."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = Config(**cfg_dict)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        nets, opts = _build(cfg, device)
        ids = [rank] if device.type == "cuda" else None
        nets = tuple(DDP(n, device_ids=ids) for n in nets)
        batches = _synthetic_batches(cfg, cfg.n_critic + 1, device, seed=1 + rank)
        amp = torch.bfloat16
        _reset_peak(device)
        for _ in range(cfg.warmup):
            _iteration(nets, opts, batches, cfg, amp, device)
        times, its = {"critic": [], "generator": []}, []
        for _ in range(cfg.repeats):
            # every rank must run the same number of iterations (their collectives pair up): rank 0 decides
            go = torch.tensor([1.0 if not its or time.time() + 2 * its[-1] < until_wall else 0.0], device=device)
            dist.broadcast(go, 0)
            if go.item() == 0:
                break
            dist.barrier()
            t = time.perf_counter()
            _iteration(nets, opts, batches, cfg, amp, device, times)
            its.append(time.perf_counter() - t)
        mine = {"rank": rank, **_step_figures(cfg, times, its), "peak_memory_gib": _peak_gib(device)}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def bench_ddp(cfg: Config, device: torch.device, deadline: float, single: dict | None) -> dict:
    import torch.multiprocessing as mp

    out = {}
    if device.type == "cuda":
        world, backend = torch.cuda.device_count(), "nccl"
        if world < 2:
            # no scaling figure; the same code still runs at world size 1, a check that NCCL and DDP run the
            # step (the gradient penalty's double backward included) on this GPU
            out["skipped"] = f"{world} GPU on this node: DDP scaling needs 2 or more (train has the 1-GPU figure)"
            out["one_gpu_check"] = True
            world = 1
    else:
        world, backend = 2, "gloo"  # --smoke: the same code on 2 CPU processes
    out.update({"world_size": world, "backend": backend, "amp": "bf16", "size": cfg.size,
                "batch_per_rank": cfg.batch, "n_critic": cfg.n_critic,
                "wrapped": "generator, local critic, global critic (DistributedDataParallel, defaults)"})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ddp.json")
        until_wall = time.time() + (deadline - time.perf_counter()) - 15.0  # leave time to gather and exit
        ctx = mp.start_processes(_ddp_worker, args=(world, asdict(cfg), path, backend, _free_port(), until_wall),
                                 nprocs=world, join=False, start_method="spawn")
        _CHILDREN.extend(ctx.processes)
        try:
            while not ctx.join(timeout=1.0):
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"DDP ranks still running after the section's budget "
                                       f"({cfg.budgets['ddp']:.0f} s)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        with open(path) as f:
            ranks = json.load(f)
    per_gpu = [r.get("images_per_s") for r in ranks]
    out["ranks"] = ranks
    if all(per_gpu) and not out.get("one_gpu_check"):
        out["images_per_s_per_gpu"] = round(statistics.median(per_gpu), 2)
        out["images_per_s_total"] = round(sum(per_gpu), 2)
        one = (single or {}).get("bf16", {}).get("images_per_s")
        out["scaling_efficiency_vs_train_bf16"] = _ratio(out["images_per_s_per_gpu"], one)
    return out


# ------------------------------------------------------------------------------------------------ (c) infer

def _infer_inputs(size: int, device: torch.device):
    """A smooth picture (1,3,size,size) in [-1,1] and a box + stripe hole (1,1,size,size), 1 = hole."""
    g = torch.Generator().manual_seed(size)
    low = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    image = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    image = (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(-1, 1)
    mask = torch.zeros(1, 1, size, size)
    mask[:, :, size // 4:size // 2, size // 3:size // 3 + size // 4] = 1  # a box
    mask[:, :, 3 * size // 4:3 * size // 4 + max(1, size // 16), :size // 2] = 1  # a stripe
    return image.to(device), mask.to(device)


def bench_infer(cfg: Config, device: torch.device, deadline: float) -> dict:
    torch.manual_seed(0)
    gen = models.for_inference(models.InpaintGenerator(cnum=cfg.cnum).to(device))
    out = {"cnum": cfg.cnum, "batch": 1, "path": "models.inpaint (holes_only attention), for_inference weights",
           "max_score_bytes": gen.attention.max_score_bytes, "sizes": {}}
    for k, size in enumerate(cfg.infer_sizes):
        until = time.perf_counter() + (deadline - time.perf_counter()) / (len(cfg.infer_sizes) - k)
        row, composites = {}, {}
        image, mask = _infer_inputs(size, device)
        for name, dt in (("float32", None), ("bf16", torch.bfloat16)):
            try:
                def call():
                    if dt is None:
                        return models.inpaint(gen, image, mask)
                    with torch.autocast(device_type=device.type, dtype=dt):
                        return models.inpaint(gen, image, mask)

                if time.perf_counter() > until:
                    row[name] = {"skipped": "the section's budget ran out"}
                    continue
                _reset_peak(device)
                base = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
                _sync(device)
                t = time.perf_counter()
                composites[name] = call()  # warm-up (reported as first_call_s, not in the median)
                _sync(device)
                first, lat = time.perf_counter() - t, []
                while len(lat) < cfg.infer_repeats and time.perf_counter() + (lat[-1] if lat else first) < until:
                    _sync(device)
                    t = time.perf_counter()
                    call()
                    _sync(device)
                    lat.append(time.perf_counter() - t)
                row[name] = {"latency_s": _median(lat), "first_call_s": round(first, 4), "timed_calls": len(lat),
                             "peak_memory_gib": _peak_gib(device),
                             "memory_before_gib": round(base, 3) if base is not None else None}
            except Exception as err:  # noqa: BLE001
                row[name] = _error(err)
        if "float32" in composites and "bf16" in composites:
            hole = (mask > 0.5).expand_as(image)
            a, b = composites["float32"], composites["bf16"]
            d = (b - a)[hole].abs()
            row["bf16_vs_float32"] = {
                "latency_speedup": _ratio(row["float32"].get("latency_s"), row["bf16"].get("latency_s")),
                "peak_memory_ratio": _ratio(row["bf16"].get("peak_memory_gib"), row["float32"].get("peak_memory_gib")),
                "known_pixels_identical": bool(torch.equal(b[~hole], image[~hole])),
                "hole_max_abs_diff": round(d.max().item(), 5), "hole_mean_abs_diff": round(d.mean().item(), 6),
                "hole_max_uint8_levels": int((models.to_uint8(b).int() - models.to_uint8(a).int()).abs().max()),
            }
        out["sizes"][str(size)] = row
        del composites, image, mask
    return out


# ------------------------------------------------------------------------------------------------ (d) data

def _jpegs(n: int, side: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (quality 90) of side x side..1.25 side: smooth colour fields with texture, like photos in size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = int(rng.integers(side, side * 5 // 4 + 1))
        low = rng.uniform(0, 255, (side // 32 + 2, w // 32 + 2, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, side), Image.Resampling.BICUBIC),
                         np.float32)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _Samples(torch.utils.data.Dataset):
    """Sample i: the training sample of JPEG i % n under key img/<i>.jpg (so every index draws its own crop
    and mask): image (S,S,3) uint8, mask (S,S,1) uint8 1 = hole, weight (S,S,1) float32."""

    def __init__(self, jpegs: list[bytes], crop: int, length: int):
        self.jpegs, self.crop, self.length = jpegs, crop, length
        self.path = _data_path()

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        key = f"img/{i:07d}.jpg"
        blob = self.jpegs[i % len(self.jpegs)]
        if self.path == "pipeline.datasets.make_sample":
            from pipeline.config import DataConfig, MaskConfig
            from pipeline.datasets import make_sample

            img, m, w = make_sample(blob, key, 0, DataConfig(crop_size=self.crop), MaskConfig())
        else:
            img, m, w = _fallback_sample(blob, key, self.crop)
        return {"image": torch.from_numpy(img), "mask": torch.from_numpy(m[..., None]),
                "weight": torch.from_numpy(w[..., None])}


def _data_path() -> str:
    try:
        import pipeline.datasets  # noqa: F401 - albumentations, simplejpeg
        return "pipeline.datasets.make_sample"
    except ImportError as err:
        return f"fallback: cv2 decode + crop + flip + pipeline.masks ({type(err).__name__}: {err})"


def _fallback_sample(blob: bytes, key: str, crop: int):
    """What make_sample does, without albumentations / simplejpeg: decode, random crop, flip, mask, weights."""
    import cv2

    from pipeline.config import MaskConfig
    from pipeline.masks import generate_mask, loss_weights, mask_rng

    masks = MaskConfig()
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    rng = mask_rng(masks.seed + 1, 0, key)
    y = int(rng.integers(0, img.shape[0] - crop + 1))
    x = int(rng.integers(0, img.shape[1] - crop + 1))
    img = img[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    m = generate_mask(masks.kind, crop, crop, mask_rng(masks.seed, 0, key), max_hole_fraction=masks.max_hole_fraction)
    return np.ascontiguousarray(img), m, loss_weights(m, masks.gamma)


def _worker_init(_):
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _to_model_batch(batch: dict, device: torch.device):
    """As jobs.trainer.to_model_batch (not imported: jobs needs Ray): uint8 batch -> model tensors on device."""
    image = models.to_model_range(batch["image"]).to(device, non_blocking=True)
    mask = batch["mask"].permute(0, 3, 1, 2).to(device, torch.float32)  # (B, 1, H, W)
    weight = batch["weight"].permute(0, 3, 1, 2).to(device, torch.float32)  # (B, 1, H, W)
    return image, mask, weight


def bench_data(cfg: Config, device: torch.device, deadline: float, single: dict | None) -> dict:
    amp = torch.bfloat16 if device.type == "cuda" else None  # the trainer: bf16 on CUDA, float32 on CPU
    jpegs = _jpegs(cfg.data_images, cfg.data_jpeg_side)
    per_it, prefetch = cfg.n_critic + 1, 4
    queued = cfg.data_workers * prefetch  # batches the loader holds ready at most
    batches = 1 + 2 * queued + (cfg.warmup + cfg.data_iterations) * per_it
    ds = _Samples(jpegs, cfg.size, length=(batches + 2) * cfg.batch)
    out = {"path": ds.path, "workers": cfg.data_workers, "crop": cfg.size, "batch": cfg.batch,
           "jpeg_px": f"{cfg.data_jpeg_side} x {cfg.data_jpeg_side}..{cfg.data_jpeg_side * 5 // 4}",
           "amp": "bf16" if amp else "float32", "n_critic": cfg.n_critic}
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch, shuffle=False, num_workers=cfg.data_workers,
                                         pin_memory=device.type == "cuda", drop_last=True, prefetch_factor=prefetch,
                                         persistent_workers=False, worker_init_fn=_worker_init)
    it = iter(loader)
    t = time.perf_counter()
    next(it)  # the workers' start
    out["first_batch_s"] = round(time.perf_counter() - t, 3)
    # the loader alone, steady state: drain what it made ahead while starting, then time as many batches again
    for _ in range(queued):
        next(it)
    t = time.perf_counter()
    for _ in range(queued):
        next(it)
    out["loader_images_per_s"] = round(queued * cfg.batch / (time.perf_counter() - t), 2)
    # iterations fed by the loader, as the trainer's run_step: n_critic critic steps + one generator step
    nets, opts = _build(cfg, device)
    opt_g, opt_d = opts
    wait = step = 0.0
    done = 0
    for k in range(cfg.warmup + cfg.data_iterations):
        if k >= cfg.warmup and done and time.perf_counter() + (wait + step) / done > deadline:
            break
        w = s = 0.0
        for j in range(per_it):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            image, mask, weight = _to_model_batch(batch, device)
            if j < cfg.n_critic:
                critic_step(*nets, opt_d, image, mask, local_size=cfg.size // 2, amp_dtype=amp)
            else:
                generator_step(*nets, opt_g, image, mask, weight, local_size=cfg.size // 2, amp_dtype=amp)
            _sync(device)
            w, s = w + t1 - t0, s + time.perf_counter() - t1
        if k >= cfg.warmup:  # the warm-up iterations also let the loader fill its queue again
            wait, step, done = wait + w, step + s, done + 1
    del it, loader
    out["timed_iterations"] = done
    if done:
        out["data_wait_s_per_iteration"] = round(wait / done, 4)
        out["step_s_per_iteration"] = round(step / done, 4)
        out["data_wait_share"] = round(wait / (wait + step), 4)
        out["fed_images_per_s"] = round(done * per_it * cfg.batch / (wait + step), 2)
    key = "bf16" if amp else "float32"
    synthetic = (single or {}).get(key, {}).get("images_per_s")
    if synthetic:
        out["train_images_per_s_synthetic"] = synthetic
        out["loader_vs_step_rate"] = _ratio(out["loader_images_per_s"], synthetic)
    return out


# ------------------------------------------------------------------------------------------------ the run

def _error(err: BaseException) -> dict:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {err}", "traceback_tail": "".join(tb)[-1500:]}


def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / GIB, 1))
    else:
        env["threads"] = torch.get_num_threads()
    return env


SECTIONS = ("train", "ddp", "infer", "data")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a check of this script)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--n-critic", type=int, default=None, help="critic steps per generator step (default 5; smoke 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed training iterations at most")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default 290)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    cfg = Config.cpu_smoke() if args.smoke else Config.gpu()
    if args.n_critic is not None:
        cfg.n_critic = args.n_critic
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.time_limit is not None:
        cfg.time_limit = args.time_limit
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --smoke for the CPU check")
    device = torch.device("cuda", 0) if not args.smoke else torch.device("cpu")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    result = {"benchmark": "gpu", "smoke": args.smoke, "wall_s": None, "config": asdict(cfg),
              "environment": _environment(device)}
    lock = threading.Lock()

    def dump(final: bool) -> None:
        with lock:
            result["wall_s"] = round(time.perf_counter() - start, 1)
            text = json.dumps(result, indent=2, default=str)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
            if final:
                print(text, flush=True)

    def watchdog() -> None:
        result["aborted"] = f"the whole run reached --time-limit {cfg.time_limit:.0f} s"
        for p in _CHILDREN:
            if p.is_alive():
                p.kill()
        for _ in range(3):  # the main thread may be adding a section's figures right now
            try:
                dump(final=True)
                break
            except RuntimeError:
                time.sleep(0.2)
        os._exit(3)

    timer = threading.Timer(cfg.time_limit, watchdog)
    timer.daemon = True
    timer.start()
    for name in sections:
        t = time.perf_counter()
        deadline = t + cfg.budgets[name]
        print(f"[gpu.py] {name} (budget {cfg.budgets[name]:.0f} s)", file=sys.stderr, flush=True)
        try:
            if name == "train":
                result[name] = bench_train(cfg, device, deadline)
            elif name == "ddp":
                result[name] = bench_ddp(cfg, device, deadline, result.get("train"))
            elif name == "infer":
                result[name] = bench_infer(cfg, device, deadline)
            else:
                result[name] = bench_data(cfg, device, deadline, result.get("train"))
        except Exception as err:  # noqa: BLE001 - record it, go on with the next section
            result[name] = _error(err)
        result[name]["section_wall_s"] = round(time.perf_counter() - t, 1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dump(final=False)
    timer.cancel()
    dump(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
