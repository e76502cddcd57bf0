"""Training and validation data from prepared shards.

``build_train_dataset`` streams ``<shards>/train/*.parquet`` through Ray Data: one item per (epoch, shard),
each epoch's shards in a seeded random order, and a pool of decode actors (one CPU each) that stream each
item's row groups through decode + augment + mask + loss weights, drawing crops and masks from (seed,
epoch, key), so masks and crops differ between epochs and repeat exactly for the same ``masks.seed``. Rows
that fail to decode are skipped, counted and logged, never fatal (a per-row try/except: Ray's
``max_errored_blocks`` would drop whole blocks). Training workers consume it with::

    ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=B, local_shuffle_buffer_size=data.shuffle_buffer, drop_last=True)

and get ``image`` (B, H, W, 3) uint8, ``mask`` (B, H, W, 1) uint8 (1 = hole), ``weight`` (B, H, W, 1) float32
(gamma ** distance to the nearest known pixel in holes, 1 on known pixels), H = W = data.crop_size.

``load_val_set`` reads the val split directly with pyarrow (no Ray): the first ``count`` decodable images
in key order, centre-cropped, with fixed masks (epoch ``VAL_EPOCH``), identical on every call. A val shard
that cannot be read is skipped like a train shard: logged, and recorded in the same counter when Ray is up.

``watch_stream`` guards a consumer: a stream that yields nothing for ``data.stall_timeout_s`` seconds
raises ``StreamStalled`` (``stall_message`` says what to check) instead of waiting forever.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

from pipeline import storage
from pipeline.augment import Augmenter, augment_seed, center_crop
from pipeline.config import DataConfig, MaskConfig
from pipeline.images import ImageRejected, decode_image
from pipeline.masks import generate_mask, loss_weights, mask_rng, stable_seed
from pipeline.progress import quiet_ray_data

log = logging.getLogger(__name__)

VAL_EPOCH = -1  # the "epoch" the fixed validation masks are drawn for
SKIP_COUNTER = "deepfill_pipeline_skipped_rows"  # named Ray actor recording skipped rows
SKIP_KEYS_KEPT = 1000


# ------------------------------------------------------------------------------------- skipped-row counter

def _skip_counter_cls():
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        """Counts rows the training pipeline skipped, keeping the first keys and reasons."""

        def __init__(self):
            self.count = 0
            self.rows: list[dict] = []

        def add(self, rows: list[dict]) -> None:
            self.count += len(rows)
            room = SKIP_KEYS_KEPT - len(self.rows)
            if room > 0:
                self.rows.extend(rows[:room])

        def get(self) -> dict:
            return {"count": self.count, "rows": list(self.rows)}

    return SkipCounter


def _record_skips(rows: list[dict], split: str = "train") -> None:
    """Report skipped rows (``{"key", "reason"}``) of ``split`` to the named counter actor (created on first
    use) and to the log. Outside Ray (``load_val_set`` in a plain process) they are only logged."""
    import ray

    for r in rows:
        log.warning("skipped %s row %s: %s", "training" if split == "train" else split, r["key"], r["reason"])
    rows = [{**r, "split": split} for r in rows]
    if split != "train" and not ray.is_initialized():
        return
    try:
        counter = _skip_counter_cls().options(name=SKIP_COUNTER, get_if_exists=True, lifetime="detached",
                                              namespace="deepfill").remote()
        ray.get(counter.add.remote(rows))  # recorded before the batch moves on: counts are exact
    except Exception as err:  # noqa: BLE001 - reporting must never fail training
        log.warning("could not record skipped rows: %s", err)


def skipped_rows() -> dict:
    """``{"count": int, "rows": [{"key", "reason", "split"}, ...]}``: rows (and unreadable shards, reason
    ``unreadable_shard: ...``) the training pipeline and the val set skipped so far in this Ray cluster
    (all datasets, all epochs; a row skipped in two epochs counts twice); ``split`` is "train" or "val"."""
    import ray

    try:
        counter = ray.get_actor(SKIP_COUNTER, namespace="deepfill")
    except ValueError:
        return {"count": 0, "rows": []}
    return ray.get(counter.get.remote())


def reset_skipped_rows() -> None:
    """Forget the skipped rows recorded so far (kills the counter actor)."""
    import ray

    try:
        ray.kill(ray.get_actor(SKIP_COUNTER, namespace="deepfill"))
    except ValueError:
        pass


# ------------------------------------------------------------------------------------- the per-batch work

@functools.lru_cache(maxsize=8)
def _augmenter(crop_size: int, flip: bool, color_jitter: float) -> Augmenter:
    return Augmenter(crop_size, flip=flip, color_jitter=color_jitter)


def make_sample(data_bytes: bytes, key: str, epoch: int, data: DataConfig, masks: MaskConfig):
    """One training sample: (image (S, S, 3) uint8, mask (S, S) uint8 1 = hole, weight (S, S) float32).

    Deterministic in (masks.seed, epoch, key). Raises ImageRejected for undecodable bytes.
    """
    image = decode_image(data_bytes, max_pixels=data.max_pixels)
    aug = _augmenter(data.crop_size, data.flip, data.color_jitter)
    crop = aug(image, augment_seed(masks.seed, epoch, key))
    s = data.crop_size
    mask = generate_mask(masks.kind, s, s, mask_rng(masks.seed, epoch, key), max_hole_fraction=masks.max_hole_fraction)
    return crop, mask, loss_weights(mask, masks.gamma)


def transform_batch(batch: dict, *, epoch: int, data: DataConfig, masks: MaskConfig,
                    with_keys: bool = False) -> dict:
    """Ray Data UDF: {"key": (N,) str, "image": (N,) bytes} -> {"image" (M,S,S,3) uint8, "mask" (M,S,S,1)
    uint8, "weight" (M,S,S,1) float32} (+ "key", "epoch" with ``with_keys``), M <= N (undecodable rows are
    skipped and recorded)."""
    s = data.crop_size
    keys, images, mask_list, weights, skipped = [], [], [], [], []
    for key, blob in zip(batch["key"], batch["image"]):
        key = str(key)
        try:
            img, m, w = make_sample(bytes(blob), key, epoch, data, masks)
        except ImageRejected as err:
            skipped.append({"key": key, "reason": err.reason})
            continue
        except Exception as err:  # noqa: BLE001 - one bad row must never stop training
            skipped.append({"key": key, "reason": f"error: {type(err).__name__}"})
            continue
        keys.append(key)
        images.append(img)
        mask_list.append(m)
        weights.append(w)
    if skipped:
        _record_skips(skipped)
    if not images:
        out = {"image": np.zeros((0, s, s, 3), np.uint8), "mask": np.zeros((0, s, s, 1), np.uint8),
               "weight": np.zeros((0, s, s, 1), np.float32)}
    else:
        out = {
            "image": np.stack(images),  # (M, S, S, 3) uint8
            "mask": np.stack(mask_list)[..., None],  # (M, S, S, 1) uint8, 1 = hole
            "weight": np.stack(weights)[..., None],  # (M, S, S, 1) float32
        }
    if with_keys:
        out["key"] = np.asarray(keys, dtype=object)
        out["epoch"] = np.full(len(keys), epoch, np.int64)
    return out


# ------------------------------------------------------------------------------------- datasets

def _shard_rows(uri: str, options: dict | None) -> int:
    """Rows of one Parquet shard, from its footer."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri, options)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def build_train_dataset(data: DataConfig, masks: MaskConfig, *, epochs: int = 1, start_epoch: int = 0,
                        skip_rows: int = 0, shard_rows: dict[str, int] | None = None, with_keys: bool = False):
    """A Ray Dataset of training samples for epochs ``start_epoch .. start_epoch + epochs - 1`` over
    ``<data.shards>/train``.

    ``skip_rows``: rows of ``start_epoch`` already consumed (a resumed job's place in the stream): the
    epoch's first shards, in its seeded order, are left out while their rows fit in ``skip_rows``, so a
    resumed stream repeats at most the rows of the one shard it stopped in (the stream's block) and skips
    none. Shard sizes come from ``shard_rows`` (file name -> rows, the manifest's) or the shards' footers.

    Columns: image (S, S, 3) uint8, mask (S, S, 1) uint8 (1 = hole), weight (S, S, 1) float32, with
    S = data.crop_size; with ``with_keys`` also key (str) and epoch (int64), for inspection (not for
    iter_torch_batches, which cannot batch strings).

    One Ray Data pipeline for all epochs: its items are (epoch, shard file) pairs, each epoch's shards in
    their own seeded order (the block-order shuffle), and an actor pool (``data.decode_workers`` actors of
    one CPU, or autoscaling from 1 to the free CPUs) streams each item's row groups through decode + augment
    + mask + loss weights, drawing crops and masks from (masks.seed, epoch, key). Actors by default: each
    actor has its next items queued while it works, where a task per item leaves its CPU idle between
    items (benchmarks/pipeline.py measures both); ``data.decode_pool="tasks"`` runs one task per item
    instead, which skips the actors' start-up (short jobs and tests). So each epoch
    differs, the same seed repeats, a resumed job starts at its own epoch, and a shard that cannot be read
    is skipped and recorded like a bad row instead of failing the plan on the driver.
    """
    import ray

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    if not data.shards:
        raise ValueError("data.shards is empty: give the URI of a `deepfill prepare` output")
    train_uri = storage.join(data.shards, "train")
    files = storage.list_files(train_uri, (".parquet",), data.storage)
    if not files:
        raise ValueError(f"no Parquet shards under {storage.redact(train_uri)}: run `deepfill prepare` first")
    if skip_rows < 0:
        raise ValueError(f"skip_rows must be >= 0, got {skip_rows}")
    items = []
    for epoch in range(start_epoch, start_epoch + epochs):
        order = np.random.default_rng(stable_seed("blocks", masks.seed, epoch)).permutation(len(files))
        items.extend({"epoch": epoch, "file": storage.join(train_uri, files[i])} for i in order)
    skipped = 0
    while skip_rows and len(items) > 1:  # whole shards of the start epoch that the job has consumed
        name = items[0]["file"].rsplit("/", 1)[-1]
        rows = (shard_rows or {}).get(name)
        rows = _shard_rows(items[0]["file"], data.storage) if rows is None else int(rows)
        if skipped + rows > skip_rows or items[0]["epoch"] != start_epoch:
            break
        skipped += rows
        items.pop(0)
    if skip_rows:
        log.info("training stream resumes in epoch %d after %d of the %d rows consumed (%d shard(s) left out)",
                 start_epoch, skipped, skip_rows, len(files) * epochs - len(items))
    # Ray Train builds this dataset in its controller and runs it in a SplitCoordinator, processes whose
    # DataContext the driver's pipeline.cluster.connect never touched: quiet its progress bars here
    quiet_ray_data()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs = {"data": data, "masks": masks, "with_keys": with_keys}
    if data.decode_pool == "tasks":  # one task per item: nothing to start, an idle gap between items
        return ds.map_batches(_shard_samples, fn_kwargs=kwargs, batch_size=1, batch_format="numpy")
    pool = (ray.data.ActorPoolStrategy(size=data.decode_workers) if data.decode_workers
            else ray.data.ActorPoolStrategy(min_size=1, max_size=None))
    return ds.map_batches(ShardSampler, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
                          compute=pool)


class ShardSampler:
    """Ray Data actor UDF: one {"epoch", "file"} item -> batches of training samples (``_shard_samples``)."""

    def __init__(self, *, data: DataConfig, masks: MaskConfig, with_keys: bool = False):
        self.data, self.masks, self.with_keys = data, masks, with_keys

    def __call__(self, item: dict):
        yield from _shard_samples(item, data=self.data, masks=self.masks, with_keys=self.with_keys)


def _shard_samples(item: dict, *, data: DataConfig, masks: MaskConfig, with_keys: bool):
    """Ray Data generator UDF: one {"epoch", "file"} item -> batches of training samples (transform_batch),
    ``data.batch_rows`` rows at a time, streamed row group by row group."""
    import pyarrow.parquet as pq

    epoch, uri = int(item["epoch"][0]), str(item["file"][0])
    fs, path = storage.pyarrow_filesystem(uri, data.storage)
    try:
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=data.batch_rows, columns=["key", "image"]):
                batch = {"key": rb.column("key").to_pylist(), "image": rb.column("image").to_pylist()}
                out = transform_batch(batch, epoch=epoch, data=data, masks=masks, with_keys=with_keys)
                if len(out["image"]):
                    yield out
    except (OSError, ValueError) as err:  # an unreadable shard: record it, keep training on the others
        _record_skips([{"key": storage.redact(uri), "reason": f"unreadable_shard: {type(err).__name__}"}])


def load_val_set(data: DataConfig, masks: MaskConfig, count: int) -> dict[str, np.ndarray]:
    """The fixed validation set: the first ``count`` decodable images of ``<data.shards>/val`` in key order.

    Returns {"key": (N,) str, "image": (N, S, S, 3) uint8 centre crops, "mask": (N, S, S, 1) uint8 (1 = hole),
    "weight": (N, S, S, 1) float32}, N <= count, identical on every call (masks drawn for epoch VAL_EPOCH).
    """
    import pyarrow.parquet as pq

    s = data.crop_size
    keys, images, mask_list, weights = [], [], [], []
    if count > 0:
        fs, root = storage.pyarrow_filesystem(storage.join(data.shards, "val"), data.storage)
        names = storage.list_files(storage.join(data.shards, "val"), (".parquet",), data.storage)
        for name in names:
            try:
                table = pq.read_table(f"{root}/{name}", filesystem=fs, columns=["key", "image"])
            except (OSError, ValueError) as err:  # an unreadable shard: record it, validate on the others
                uri = storage.redact(storage.join(data.shards, "val", name))
                _record_skips([{"key": uri, "reason": f"unreadable_shard: {type(err).__name__}"}], "val")
                continue
            order = np.argsort(np.asarray(table.column("key").to_pylist(), dtype=object), kind="stable")
            col_key, col_img = table.column("key"), table.column("image")
            for i in order:
                key = col_key[int(i)].as_py()
                try:
                    img = center_crop(decode_image(col_img[int(i)].as_py(), max_pixels=data.max_pixels), s)
                except ImageRejected as err:
                    _record_skips([{"key": key, "reason": err.reason}], "val")
                    continue
                m = generate_mask(masks.kind, s, s, mask_rng(masks.seed, VAL_EPOCH, key),
                                  max_hole_fraction=masks.max_hole_fraction)
                keys.append(key)
                images.append(img)
                mask_list.append(m)
                weights.append(loss_weights(m, masks.gamma))
                if len(keys) >= count:
                    break
            if len(keys) >= count:
                break
    if count > 0 and len(keys) < count:
        log.warning("val set has %d images, %d asked for", len(keys), count)
    if not keys:
        return {"key": np.zeros((0,), dtype=object), "image": np.zeros((0, s, s, 3), np.uint8),
                "mask": np.zeros((0, s, s, 1), np.uint8), "weight": np.zeros((0, s, s, 1), np.float32)}
    return {
        "key": np.asarray(keys, dtype=object),
        "image": np.stack(images),  # (N, S, S, 3) uint8
        "mask": np.stack(mask_list)[..., None],  # (N, S, S, 1) uint8, 1 = hole
        "weight": np.stack(weights)[..., None],  # (N, S, S, 1) float32
    }


# ------------------------------------------------------------------------------------- the stall watchdog

T = TypeVar("T")


class StreamStalled(TimeoutError):
    """A watched stream yielded nothing for its timeout (``watch_stream``)."""


def stall_message(data: DataConfig, timeout_s: float) -> str:
    """What a training worker says when its batches stop for ``timeout_s`` seconds: the option, the shards
    and what to check."""
    shards = storage.redact(storage.join(data.shards, "train")) if data.shards else "the given dataset"
    return (f"no training batch for {timeout_s:g} s (data.stall_timeout_s) from {shards}: the data pipeline "
            f"is stuck or starved. Check that the cluster has CPUs free for the decode stage beyond what the "
            f"training workers reserve (data.decode_pool={data.decode_pool}, data.decode_workers="
            f"{data.decode_workers}: {data.decode_cpus} CPU(s)), that the shards are reachable (data.storage) "
            f"and the Ray Data logs; raise data.stall_timeout_s if the first batches legitimately take "
            f"longer (0 = wait forever)")


_ITEM, _END, _ERROR = "item", "end", "error"


def watch_stream(items: Iterable[T], timeout_s: float, message: str) -> Iterator[T]:
    """Yield from ``items``; raise ``StreamStalled(message)`` when the next item takes more than
    ``timeout_s`` seconds to arrive (0 = no watch: a plain pass-through).

    The time counted is the consumer's wait: a background thread pulls ``items`` one item ahead, so a slow
    consumer (a long training step) never counts against the stream. An exception of ``items`` is raised
    in the consumer; closing this generator stops the thread at its next item (a thread stuck inside the
    stream stays, as a daemon, until the process ends).
    """
    if not timeout_s:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put((_ERROR, err))

    threading.Thread(target=pump, name="deepfill-stream-watch", daemon=True).start()
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise StreamStalled(message) from None
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
