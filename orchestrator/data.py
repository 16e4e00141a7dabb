"""A training worker's batches: each task's training batches and every eval set's, on its device.

Two sources, one batch format (`pixels` uint8 (B,3,H,W), `text` ids, `label`, on the device):
- a split the plan marks `cached` is decoded once in this process (streams/local_reader.py) and
  kept: every eval and control set (scored after every task) and small training splits. A cached
  training split is shuffled as one global batch order per epoch, seeded by (seed, task, epoch),
  and each worker takes its slice of every global batch: the same batches at any world size;
- a training split too large to keep streams from its shards through Ray Data (one dataset shard
  per worker, `ray.train.get_dataset_shard`), shuffled by the iterator's seeded local buffer.
Eval sets that are not cached are read from their shards in chunks at every evaluation.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from methods.models import TokenizerFactory, normalize_pixels
from orchestrator.plan import RunPlan, TaskPlan
from streams.local_reader import DecodedSplit, iter_split, read_split
from streams.samples import RowDecoder

EVAL_CHUNK_ROWS = 4096  # rows decoded at a time from an eval set that is not kept in memory


class WorkerData:
    def __init__(self, plan: RunPlan, rank: int, world: int, device: torch.device, image_mean, image_std):
        self.plan, self.config = plan, plan.config
        self.rank, self.world, self.device = rank, world, device
        self.image_mean, self.image_std = image_mean, image_std
        self.tokenizer_factory = TokenizerFactory(self.config.model.name)
        self.skipped: list[str] = []
        self._eval_cache: dict[tuple, DecodedSplit] = {}
        self._train_cache: tuple[str, DecodedSplit] | None = None
        self.eval_sets_decoded_by: set[str] = set()  # in a sweep: the runs whose decoded eval sets this one took

    # ---- reading -----------------------------------------------------------------------------
    def _decoder(self, classes, all_captions: bool = False) -> RowDecoder:
        return RowDecoder(self.plan.image_size, self.tokenizer_factory, list(classes),
                          on_bad_sample=self.config.data.on_bad_sample,
                          ship_encoded=self.config.data.decode == "device", all_captions=all_captions)

    def _eval_decoder(self, task: TaskPlan) -> RowDecoder:
        # retrieval is scored over every caption of each image (COCO/Flickr30K: five)
        return self._decoder(task.classes, all_captions=task.kind == "retrieval")

    def _read_eval(self, task: TaskPlan, share: tuple[int, int]) -> DecodedSplit:
        decoded = read_split(list(task.eval.urls), self._eval_decoder(task), cap=task.eval.cap, share=share)
        self.skipped.extend(decoded.skipped)
        return decoded

    def _on_device(self, rows: dict) -> dict:
        if "encoded" in rows:
            from streams.image_decode import decode_batch

            pixels = decode_batch(rows["encoded"], self.plan.image_size, self.device, keys=rows["key"])
        else:
            pixels = rows["pixels"].to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        batch = {"pixels": pixels, "text": rows["text"].to(self.device, non_blocking=True),
                 "label": rows["label"].to(self.device, non_blocking=True)}
        if "captions" in rows:
            batch["captions"] = rows["captions"].to(self.device, non_blocking=True)
            batch["caption_row"] = rows["caption_row"]
        return batch

    # ---- training ----------------------------------------------------------------------------
    def epoch_batches(self, task: TaskPlan, epoch: int, *, seed_offset: int = 0,
                      augment: bool | None = None) -> Iterator[dict]:
        """This worker's batches of one epoch of `task`, normalised (`image`) and augmented as
        configured. `seed_offset` draws another order of the same rows (the independent batches
        LwF distils on are drawn with augment=False)."""
        augment = self.config.train.augment if augment is None else augment
        for batch in self._epoch(task, epoch + 1000 * seed_offset):
            pixels = random_resized_crop(batch["pixels"]) if augment else batch["pixels"]
            yield {**batch, "pixels": pixels, "image": normalize_pixels(pixels, self.image_mean, self.image_std)}

    def endless_batches(self, task: TaskPlan, first_epoch: int = 0, **options) -> Iterator[dict]:
        """Epoch after epoch of `epoch_batches`; the loop counts the steps."""
        for epoch in range(first_epoch, first_epoch + 10**9):
            got = False
            for batch in self.epoch_batches(task, epoch, **options):
                got = True
                yield batch
            if not got:
                raise RuntimeError(f"task {task.name!r}: an epoch gave worker {self.rank} no batch "
                                   f"(were its samples skipped as bad?)")

    def _epoch(self, task: TaskPlan, epoch: int) -> Iterator[dict]:
        config = self.config
        seed = (config.train.seed * 1000 + task.index) * 1000 + epoch
        local = config.train.batch_size // self.world
        if task.train.cached:
            split = self.train_split(task)
            rows = len(split)
            if config.train.shuffle_buffer:
                order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
            else:
                order = torch.arange(rows)
            for start in range(0, rows - config.train.batch_size + 1, config.train.batch_size):
                mine = order[start + self.rank * local:start + (self.rank + 1) * local]
                yield self._on_device(split.rows(mine))
            return
        import ray.train

        shard = ray.train.get_dataset_shard(task.train_dataset_name)
        iterate = {}
        if config.data.decode == "device":
            iterate["collate_fn"] = _encoded_columns
        for raw in shard.iter_torch_batches(batch_size=local, drop_last=True,
                                            local_shuffle_buffer_size=config.train.shuffle_buffer or None,
                                            local_shuffle_seed=seed if config.train.shuffle_buffer else None, **iterate):
            yield self._on_device(raw)

    def train_split(self, task: TaskPlan) -> DecodedSplit:
        """The task's whole training split, decoded once (only the current task's is kept)."""
        if self._train_cache is None or self._train_cache[0] != task.name:
            self._train_cache = None  # free the previous task's pixels before decoding the next
            split = read_split(list(task.train.urls), self._decoder(task.classes))
            # every worker reads every row; count the skipped ones once
            if self.rank == 0:
                self.skipped.extend(split.skipped)
            self._train_cache = (task.name, split)
        return self._train_cache[1]

    def train_samples(self, task: TaskPlan) -> int:
        return len(self.train_split(task)) if task.train.cached else task.train.samples

    # ---- evaluation --------------------------------------------------------------------------
    def eval_batches(self, task: TaskPlan) -> Iterator[dict]:
        """This worker's share of `task`'s eval (or control) set, in eval batches."""
        batch_size = self.config.eval.batch_size
        if task.eval.cached:
            key = (task.eval.urls, task.classes, task.kind)  # tasks that share an eval set share its decoded rows
            if key not in self._eval_cache:
                self._eval_cache[key] = self._shared_or_read(task)
            chunks = [self._eval_cache[key]]
        else:
            chunks = iter_split(list(task.eval.urls), self._eval_decoder(task), cap=task.eval.cap,
                                share=(self.rank, self.world), chunk_rows=EVAL_CHUNK_ROWS)
        for chunk in chunks:
            if not task.eval.cached:
                self.skipped.extend(chunk.skipped)
            for start in range(0, len(chunk), batch_size):
                yield self._on_device(chunk.rows(slice(start, start + batch_size)))

    @property
    def kept_eval_sets(self) -> int:
        return len(self._eval_cache)

    def _shared_or_read(self, task: TaskPlan) -> DecodedSplit:
        """This worker's share of a kept eval set. In a sweep, every trial would decode the same
        rows: the first one that does offers them to the sweep's SharedValues actor and the others
        take them (keyed by everything that decides the decoded rows, this worker's share included)."""
        share = (self.rank, self.world)
        if self.plan.shared is None:
            return self._read_eval(task, share)
        import ray

        from orchestrator.plan import eval_set_key

        key = eval_set_key(self.plan, task, share)
        found = ray.get(self.plan.shared.get.remote(key))
        if found is not None:
            self.skipped.extend(found["split"].skipped)  # counted in every run that scores these rows
            self.eval_sets_decoded_by.add(found["run_id"])
            return found["split"]
        split = self._read_eval(task, share)
        self.plan.shared.put.remote(key, {"split": split, "run_id": self.plan.run_id})
        return split

    def reference_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference data for methods that distil on it: this worker's share of the images
        (normalised, on the device) and the reference captions' token ids (all of them, on every
        worker). The captions come from the stream's captions.txt when it has one - ZSCL draws its
        texts apart from its images - else they are the images' own captions."""
        import itertools

        reference = self.plan.reference
        decoded = read_split(list(reference.urls), self._decoder(()), limit=reference.samples)
        self.skipped.extend(decoded.skipped)
        pixels = self._on_device(decoded.rows(slice(self.rank, None, self.world)))["pixels"]
        texts = decoded.text
        if self.plan.reference_captions:
            count = self.config.data.reference_texts or reference.samples
            with open(self.plan.reference_captions, encoding="utf-8") as lines:
                captions = [line.strip() for line in itertools.islice((x for x in lines if x.strip()), count)]
            texts = torch.from_numpy(self._decoder(()).tokenize(captions))
        return normalize_pixels(pixels, self.image_mean, self.image_std), texts

    def skipped_count(self) -> int:
        return len(self.skipped)


def _encoded_columns(batch: dict) -> dict:
    """iter_torch_batches' collate for `data.decode: device`: file bytes and keys stay Python objects."""
    return {"encoded": list(batch["encoded"]), "key": [str(k) for k in batch["key"]],
            "text": torch.as_tensor(batch["text"]), "label": torch.as_tensor(batch["label"])}


def random_resized_crop(pixels: torch.Tensor, scale=(0.9, 1.0)) -> torch.Tensor:
    """Per-image random crop (area fraction in `scale`, aspect 3/4-4/3) resized back, batched on device."""
    from torchvision.ops import roi_align

    n, _, h, w = pixels.shape
    area = torch.empty(n, device=pixels.device).uniform_(*scale) * h * w
    log_ratio = torch.empty(n, device=pixels.device).uniform_(math.log(3 / 4), math.log(4 / 3))
    ratio = log_ratio.exp()
    crop_w = (area * ratio).sqrt().clamp(max=w)
    crop_h = (area / ratio).sqrt().clamp(max=h)
    x0 = torch.rand(n, device=pixels.device) * (w - crop_w)
    y0 = torch.rand(n, device=pixels.device) * (h - crop_h)
    boxes = torch.stack([torch.arange(n, device=pixels.device, dtype=torch.float), x0, y0, x0 + crop_w, y0 + crop_h], 1)
    out = roi_align(pixels.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)
