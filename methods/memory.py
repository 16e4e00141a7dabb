"""Replay memory: a fixed budget of stored training samples (uint8 pixels, token ids, labels, task).

Selection policies:
* reservoir (ER, IncCLIP, CTP+ER; spec §4.9): every sample of the training stream is offered once;
  the first `capacity` are kept, after that the n-th sample replaces a uniformly drawn slot with
  probability capacity/n, so the memory is a uniform sample of everything seen so far.
* herding (iCaRL; spec §3.4, §4.10): after a task, pick the samples whose running feature mean best
  matches the task's mean feature (Welling 2009 / iCaRL), stored in herding rank so that shrinking
  a task's share keeps its best-ranked exemplars (fixes the dataset-order quirk of §4.10).

Samples are stored, not ids, because vlcl streams are not randomly addressable. Under data
parallelism every worker must hold the same memory: reservoir insertion is offered the *gathered*
global batch and draws from one generator seeded identically on every rank (a deterministic rule,
no communication); herding runs on rank 0 and its selection is broadcast (`broadcast_object`).
Replay draws a global memory batch from the same generator and each rank keeps its own slice
(`draw`), or marks a Binomial share of the global batch's rows for replacement by memory samples
(`draw_replacing`: CTP's buffer appended to the task data, see methods/er.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Batch, TaskInfo, batch_from_pixels
from methods.distributed import gather_no_grad, rank, world_size

SAMPLE_KEYS = ("pixels", "text", "label")


class ReplayMemoryError(ValueError):
    """A batch that cannot be stored in (or a state that cannot be loaded into) a replay memory."""


def require_pixels(batch: Batch, method: str) -> None:
    if "pixels" not in batch:
        raise ReplayMemoryError(
            f"{method}: batch['pixels'] is missing; replay methods store the uint8 images (B,3,H,W) "
            f"the batch was normalised from. Add a 'pixels' entry to every training batch.")


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = model.visual.preprocess_cfg
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def herding_selection(features: torch.Tensor, count: int) -> torch.Tensor:
    """iCaRL herding: indices (in selection order) of `count` rows of `features` (N, D) whose running
    mean greedily tracks the mean of all rows. Rows are L2-normalised first; no row is picked twice.
    O(count·N·D): run it on the accelerator for large candidate sets."""
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    count = min(count, features.shape[0])
    target = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    for k in range(1, count + 1):
        candidate_means = (running.unsqueeze(0) + features) / k
        distance = (target.unsqueeze(0) - candidate_means).norm(dim=-1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        running += features[pick]
    return torch.tensor(chosen, dtype=torch.long)


class ReplayMemory:
    """Fixed-budget sample store. `seed` must be equal on every rank (identical memories under DDP)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ReplayMemoryError(f"memory capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: dict[str, torch.Tensor] | None = None   # pixels, text, label, task (all on CPU)

    def __len__(self) -> int:
        return 0 if self.samples is None else int(self.samples["label"].shape[0])

    # ---- inserting -----------------------------------------------------------------------------
    def _rows(self, batch: Batch, task: int) -> dict[str, torch.Tensor]:
        for key in SAMPLE_KEYS:
            if key not in batch:
                raise ReplayMemoryError(f"replay memory: batch[{key!r}] is missing (needs {', '.join(SAMPLE_KEYS)})")
        if batch["pixels"].dtype != torch.uint8:
            raise ReplayMemoryError(f"replay memory: batch['pixels'] must be uint8, got {batch['pixels'].dtype}")
        rows = {k: batch[k].detach().cpu() for k in SAMPLE_KEYS}
        rows["task"] = torch.full((rows["label"].shape[0],), task, dtype=torch.long)
        return rows

    def _append(self, rows: dict[str, torch.Tensor]) -> None:
        if self.samples is None:
            self.samples = {k: v.clone() for k, v in rows.items()}
            return
        if rows["text"].shape[1] != self.samples["text"].shape[1] or rows["pixels"].shape[1:] != self.samples["pixels"].shape[1:]:
            raise ReplayMemoryError(
                f"replay memory: new samples have pixels {tuple(rows['pixels'].shape[1:])} / text length "
                f"{rows['text'].shape[1]}, stored ones {tuple(self.samples['pixels'].shape[1:])} / "
                f"{self.samples['text'].shape[1]}; keep image size and context length fixed over the stream")
        self.samples = {k: torch.cat([self.samples[k], rows[k]], 0) for k in self.samples}

    def offer_reservoir(self, batch: Batch, task: int, gathered: bool = True) -> None:
        """Offer every sample of `batch` (gathered across ranks if `gathered`) to reservoir sampling."""
        if gathered:
            batch = {k: gather_no_grad(batch[k]) for k in SAMPLE_KEYS if k in batch}
        rows = self._rows(batch, task)
        count = int(rows["label"].shape[0])
        room = max(0, min(self.capacity - len(self), count))
        if room:
            self._append({k: v[:room] for k, v in rows.items()})
        rest = count - room
        if rest <= 0:
            self.seen += count
            return
        # the n-th sample (n = its 1-based stream position) takes slot ⌊u·n⌋ if that is < capacity
        positions = self.seen + room + torch.arange(1, rest + 1, dtype=torch.float64)
        slots = (torch.rand(rest, generator=self.generator, dtype=torch.float64) * positions).floor().long()
        self.seen += count
        for i in (slots < self.capacity).nonzero().flatten().tolist():   # in stream order: later wins
            for k in self.samples:
                self.samples[k][slots[i]] = rows[k][room + i]

    def extend(self, rows: dict[str, torch.Tensor]) -> None:
        """Append already-selected rows (keys pixels, text, label, task); they must fit the budget."""
        if len(self) + int(rows["label"].shape[0]) > self.capacity:
            raise ReplayMemoryError(f"replay memory: {len(self)} + {rows['label'].shape[0]} samples exceed capacity {self.capacity}")
        self._append(rows)

    def keep_per_task(self, count: int) -> None:
        """Keep the first `count` stored samples of every task (herding rank order)."""
        if self.samples is None:
            return
        keep = torch.zeros(len(self), dtype=torch.bool)
        for task in self.samples["task"].unique():
            where = (self.samples["task"] == task).nonzero().flatten()[:count]
            keep[where] = True
        self.samples = {k: v[keep] for k, v in self.samples.items()}

    # ---- replaying -----------------------------------------------------------------------------
    def eligible(self, before_task: int | None = None) -> torch.Tensor:
        """Indices of the stored samples a draw may pick (`before_task`: only samples of earlier tasks)."""
        if self.samples is None:
            return torch.zeros(0, dtype=torch.long)
        everything = torch.arange(len(self))
        return everything if before_task is None else everything[self.samples["task"] < before_task]

    def _pick(self, eligible: torch.Tensor, count: int) -> torch.Tensor:
        """`count` of the eligible indices: without replacement if there are enough, else with."""
        if eligible.numel() >= count:
            return eligible[torch.randperm(eligible.numel(), generator=self.generator)[:count]]
        return eligible[torch.randint(0, eligible.numel(), (count,), generator=self.generator)]

    def draw(self, local_count: int, before_task: int | None = None) -> dict[str, torch.Tensor] | None:
        """This rank's share of a global draw of `local_count * world_size` samples (with replacement
        if the memory is smaller). `before_task` restricts to samples of earlier tasks."""
        eligible = self.eligible(before_task)
        if local_count <= 0 or eligible.numel() == 0:
            return None
        order = self._pick(eligible, local_count * world_size())
        mine = order[rank() * local_count:(rank() + 1) * local_count]
        return {k: v[mine] for k, v in self.samples.items()}

    def draw_replacing(self, local_count: int, share: float, before_task: int | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Which rows of this rank's batch of `local_count` to replace by memory samples, and those samples.

        Every row of the global batch (`local_count * world_size` rows) independently becomes a memory
        row with probability `share`, so a step holds Binomial(B, share) memory rows: the mix of a
        batch drawn from the task's data with the memory appended to it. Returns (local row positions,
        CPU int64, ascending; the samples for them), or None when nothing is eligible.
        """
        eligible = self.eligible(before_task)
        if local_count <= 0 or eligible.numel() == 0:
            return None
        replaced = (torch.rand(local_count * world_size(), generator=self.generator) < share).nonzero().flatten()
        order = self._pick(eligible, replaced.numel())
        start = rank() * local_count
        mine = (replaced >= start) & (replaced < start + local_count)
        return replaced[mine] - start, {k: v[order[mine]] for k, v in self.samples.items()}

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "generator": self.generator.get_state(),
                "samples": None if self.samples is None else {k: v.clone() for k, v in self.samples.items()}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ReplayMemoryError(f"replay memory: checkpoint capacity {state['capacity']} != configured {self.capacity}; "
                                    f"resume with the same memory_size")
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        self.samples = None if state["samples"] is None else {k: v.clone() for k, v in state["samples"].items()}


def memory_batch(rows: dict[str, torch.Tensor], model: nn.Module, device: torch.device) -> Batch:
    """A training batch (normalised images on `device`) from stored rows, plus their `task` ids."""
    mean, std = model_normalization(model)
    batch = batch_from_pixels(rows["pixels"].to(device), rows["text"].to(device), rows["label"].to(device), mean, std)
    batch["task"] = rows["task"].to(device)
    return batch


def concat_batches(current: Batch, replay: Batch | None) -> Batch:
    """Current rows first, then memory rows; only the keys both have."""
    if replay is None:
        return current
    return {k: torch.cat([current[k], replay[k].to(current[k].device, current[k].dtype)], 0)
            for k in ("image", "text", "label") if k in current and k in replay}


class Replay:
    """A memory plus how a method mixes it into each step (shared by ER, iCaRL, IncCLIP, CTP+ER).

    Remembers every seen classification task's class-prompt tokens so a replayed sample of an old
    task is scored against *its own* task's classes (MTIL is task-incremental: the task id is known).
    """

    def __init__(self, capacity: int, batch_size: int, seed: int, previous_tasks_only: bool):
        self.memory = ReplayMemory(capacity, seed)
        self.batch_size = batch_size
        self.previous_tasks_only = previous_tasks_only
        self.task_prompts: dict[int, torch.Tensor] = {}
        self.pool_at_task_start = 0   # eligible samples when the running task began (the appended buffer's size)

    def start_task(self, task_index: int, prompt_tokens: torch.Tensor | None) -> None:
        if prompt_tokens is not None:
            self.task_prompts[task_index] = prompt_tokens.detach().cpu()
        self.pool_at_task_start = int(self.memory.eligible(task_index if self.previous_tasks_only else None).numel())

    def observe(self, batch: Batch, task_index: int) -> None:
        """Offer a step's current-task training batch to the reservoir (once per optimizer step)."""
        self.memory.offer_reservoir(batch, task_index)

    def appended_share(self, task: TaskInfo, method: str) -> float:
        """|M| / (|M| + train_samples): the share of memory rows in a batch drawn from the task's data
        with the memory appended (CTP's ER). |M| = the eligible memory when the task began (CTP's
        buffer is fixed during a task), or the whole current memory when the running task replays too."""
        pool = self.pool_at_task_start if self.previous_tasks_only else len(self.memory)
        if pool == 0:
            return 0.0
        if task.train_samples <= 0:
            raise ReplayMemoryError(
                f"{method}: replay_mix='appended' weighs the memory against the task's data, but "
                f"TaskInfo.train_samples of task {task.name!r} is {task.train_samples}; set it to the number of "
                f"rows in the task's training split, or use replay_mix='half_batch'")
        return pool / (pool + task.train_samples)

    def mix_appended(self, batch: Batch, model: nn.Module, task: TaskInfo, method: str
                     ) -> tuple[Batch, torch.Tensor, Batch | None]:
        """The training batch with Binomial(B, appended_share) of its rows replaced by memory samples.

        Returns (mixed batch with keys image, text, label and task; a CPU bool mask of the memory
        rows; the memory rows as a batch: None while the memory has nothing to replay, possibly
        empty on a step that drew no memory row). The batch keeps its size, so gathered losses see
        equal local batches on every rank.
        """
        rows = batch["image"].shape[0]
        is_memory = torch.zeros(rows, dtype=torch.bool)
        share = self.appended_share(task, method)
        drawn = self.memory.draw_replacing(rows, share, task.index if self.previous_tasks_only else None) if share else None
        device = batch["image"].device
        mixed = {k: batch[k] for k in ("image", "text", "label")}
        mixed["task"] = torch.full((rows,), task.index, dtype=torch.long, device=device)
        if drawn is None:
            return mixed, is_memory, None
        positions, samples = drawn
        is_memory[positions] = True
        remembered = memory_batch(samples, model, device)
        where = positions.to(device)
        for key in ("image", "text", "label", "task"):
            column = mixed[key].clone()
            column[where] = remembered[key].to(column.dtype)
            mixed[key] = column
        return mixed, is_memory, remembered

    def draw(self, model: nn.Module, local_batch: int, task_index: int) -> Batch | None:
        """A memory batch for this step (None while the memory has nothing eligible)."""
        size = self.batch_size or local_batch
        rows = self.memory.draw(size, before_task=task_index if self.previous_tasks_only else None)
        return None if rows is None else memory_batch(rows, model, next(model.parameters()).device)

    def loss(self, model: nn.Module, replay: Batch, image_features: torch.Tensor, logit_scale: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
        """Mean over memory rows: CE against the row's own task's class prompts where that task had
        classes and the row a label, else CLIP contrastive among the rows without (local, not gathered)."""
        total = image_features.new_zeros(())
        rows = replay["task"]
        by_prompts = torch.zeros_like(rows, dtype=torch.bool)
        for task in rows.unique().tolist():
            if task not in self.task_prompts:
                continue
            mine = (rows == task) & (replay["label"] >= 0)
            if not mine.any():
                continue
            by_prompts |= mine
            prompts = model.encode_text(self.task_prompts[task].to(image_features.device), normalize=True)
            logits = logit_scale * image_features[mine] @ prompts.t()
            total = total + F.cross_entropy(logits, replay["label"][mine], label_smoothing=label_smoothing,
                                            reduction="sum")
        rest = ~by_prompts
        if rest.sum() > 1:
            text = model.encode_text(replay["text"][rest], normalize=True)
            logits = logit_scale * image_features[rest] @ text.t()
            targets = torch.arange(int(rest.sum()), device=logits.device)
            pair = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
            total = total + pair * rest.sum()
        return total / rows.shape[0]

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "pool_at_task_start": self.pool_at_task_start,
                "task_prompts": {str(k): v for k, v in self.task_prompts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.task_prompts = {int(k): v for k, v in state["task_prompts"].items()}
        self.pool_at_task_start = int(state["pool_at_task_start"])
