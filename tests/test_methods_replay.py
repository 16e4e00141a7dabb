"""Replay memory (reservoir, herding, checkpoint, DDP consistency) and the replay methods' loss terms
(ER, iCaRL, IncCLIP) against hand computations."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from method_helpers import DIGIT_NAMES, TEMPLATE, classification_task, digit_batches, tiny_clip, free_port
from methods.base import HparamError
from methods.er import ER
from methods.icarl import ICaRL
from methods.inc_clip import (CaptionPerturbation, IncCLIP, TokenEmbeddingInversion, encode_text_embeddings,
                              multimodal_distillation)
from methods.losses import clip_contrastive_loss
from methods.memory import ReplayMemory, ReplayMemoryError, herding_selection


def sample_batch(indices, task_width: int = 4) -> dict:
    """Samples whose pixels, text and label all encode their stream index (to identify them later)."""
    idx = torch.as_tensor(indices)
    return {"pixels": (idx % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous(),
            "text": idx.view(-1, 1).expand(-1, task_width).contiguous(), "label": idx}


def test_reservoir_keeps_the_budget_and_samples_the_stream_uniformly():
    capacity, stream, trials = 10, 60, 300
    hits = torch.zeros(stream)
    for seed in range(trials):
        memory = ReplayMemory(capacity, seed=seed)
        for start in range(0, stream, 6):
            memory.offer_reservoir(sample_batch(range(start, start + 6)), task=0, gathered=False)
            assert len(memory) == min(capacity, start + 6)
        assert memory.seen == stream
        kept = memory.samples["label"]
        assert kept.unique().numel() == capacity            # no sample stored twice
        hits[kept] += 1
    frequency = hits / trials                                # each sample: capacity / stream = 1/6
    assert abs(frequency.mean().item() - capacity / stream) < 1e-6
    assert frequency.min() > 0.08 and frequency.max() < 0.27           # ±4 binomial sd at 300 trials
    early, late = frequency[:30].mean(), frequency[30:].mean()
    assert abs(early - late) < 0.03                          # not biased to the start or the end


def test_herding_picks_the_running_mean_matching_order_on_a_hand_example():
    # a, b, c on the unit circle; mean m = (0.5333, 0.6).
    # step 1: |m − c| = 0.211 < |m − b| = 0.667 < |m − a| = 0.760          -> c (index 2)
    # step 2: |m − (c+a)/2| = |(−0.267, 0.2)| = 0.333 < |m − (c+b)/2| = 0.380 -> a (index 0)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert herding_selection(features, 3).tolist() == [2, 0, 1]
    assert herding_selection(features * 5.0, 2).tolist() == [2, 0]   # rows are normalised first


def test_memory_checkpoint_round_trip_restores_samples_and_the_draw_sequence(tmp_path):
    memory = ReplayMemory(8, seed=3)
    memory.offer_reservoir(sample_batch(range(20)), task=1, gathered=False)
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    restored = ReplayMemory(8, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert restored.seen == 20
    for key in ("pixels", "text", "label", "task"):
        assert torch.equal(restored.samples[key], memory.samples[key])
    assert torch.equal(restored.draw(5)["label"], memory.draw(5)["label"])
    with pytest.raises(ReplayMemoryError, match="capacity"):
        ReplayMemory(4).load_state_dict(memory.state_dict())


def test_keep_per_task_truncates_each_task_to_its_first_rows_and_bad_batches_are_named():
    memory = ReplayMemory(10)
    memory.extend({**sample_batch([0, 1, 2]), "task": torch.tensor([0, 0, 0])})
    memory.extend({**sample_batch([3, 4]), "task": torch.tensor([1, 1])})
    memory.keep_per_task(2)
    assert memory.samples["label"].tolist() == [0, 1, 3, 4]
    assert memory.draw(3, before_task=1)["task"].tolist() == [0, 0, 0]
    with pytest.raises(ReplayMemoryError, match="pixels"):
        memory.offer_reservoir({"text": torch.zeros(1, 4, dtype=torch.long), "label": torch.zeros(1)}, 0, gathered=False)


def test_icarl_budget_is_k_over_t_per_task_and_exemplars_are_herded():
    model, tokenizer = tiny_clip()
    method = ICaRL(model, tokenizer, memory_size=12, herding_candidates=20, replay_batch_size=4)
    for index, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        method.before_task(classification_task(index, classes, num_tasks=3))
        for batch in digit_batches(tokenizer, classes, 10, 2, seed=index):
            method.after_step(batch, method.training_loss(batch))
        candidates = {k: v.clone() for k, v in method._candidate_rows(None).items()}
        method.after_task(method.task)
        counts = torch.bincount(method.replay.memory.samples["task"]).tolist()
        assert counts == [12 // (index + 1)] * (index + 1)
    newest = method.replay.memory.samples["task"] == 2
    expected = herding_selection(method._features(candidates["pixels"]), 4)
    assert torch.equal(method.replay.memory.samples["pixels"][newest], candidates["pixels"][expected])


def test_icarl_distills_on_memory_images_only_after_the_first_task():
    model, tokenizer = tiny_clip()
    method = ICaRL(model, tokenizer, memory_size=8, herding_candidates=16, replay_batch_size=4)
    method.before_task(classification_task(0, (0, 1)))
    batch = digit_batches(tokenizer, (0, 1), 8, 2)[0]
    terms = method.training_loss(batch)
    assert set(terms) == {"loss", "task"}
    method.after_step(batch, terms)
    method.after_task(method.task)
    method.before_task(classification_task(1, (2, 3)))
    terms = method.training_loss(digit_batches(tokenizer, (2, 3), 8, 1)[0])
    assert set(terms) == {"loss", "task", "distill_image", "distill_text"}
    assert torch.allclose(terms["loss"], terms["task"] + terms["distill_image"] + terms["distill_text"])


def test_extended_denominator_contrastive_matches_a_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    g = torch.tensor([[0.8, 0.6]])
    scale = torch.tensor(2.0)
    # image 0: logits (2, 1.2 | 1.6) target 0; image 1: (0, 1.6 | 1.2) target 1
    i2t = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2) + math.exp(1.6)))
           - math.log(math.exp(1.6) / (1 + math.exp(1.6) + math.exp(1.2)))) / 2
    # text 0: logits (2, 0) target 0; text 1: (1.2, 1.6) target 1 (negatives only enter image→text)
    t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    got = clip_contrastive_loss(f, t, scale, extra_text_negatives=g)
    assert torch.allclose(got, torch.tensor(0.5 * (i2t + t2i)), atol=1e-6)


def test_multimodal_distillation_is_zero_for_an_identical_teacher_and_matches_a_hand_kl():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    one = torch.tensor(1.0)
    assert multimodal_distillation(f, t, one, f, t, one, 1.0).abs() < 1e-7
    # student rows: logits (1, 0), (0, 1); teacher (scale 2): (2, 0), (0, 2). Both directions alike.
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    q = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = float((p * (p.log() - q.log())).sum())
    assert torch.allclose(multimodal_distillation(f, t, one, f, t, torch.tensor(2.0), 1.0), torch.tensor(kl), atol=1e-6)


def test_caption_perturbation_swaps_one_content_token_for_a_seen_one_numbers_for_numbers():
    _, tokenizer = tiny_clip()
    perturb = CaptionPerturbation(tokenizer, swaps=1)
    perturb.observe(tokenizer(["a red car", "a blue boat", "3 dogs", "5 cats"]))
    red_car, three_dogs = tokenizer(["a red car", "3 dogs"])
    seen_content = set(tokenizer(["red car blue boat dogs cats"])[0, 1:7].tolist())
    five = int(tokenizer(["5"])[0, 1])
    for seed in range(20):
        out = perturb.generate(torch.stack([red_car, three_dogs]), 2, torch.Generator().manual_seed(seed))
        assert out.shape == (4, red_car.shape[0])
        for row, source, is_number_caption in zip(out, [red_car, red_car, three_dogs, three_dogs], [False, False, True, True]):
            changed = (row != source).nonzero().flatten().tolist()
            assert len(changed) == 1
            position = changed[0]
            assert position in (1, 2) if is_number_caption else position in (2, 3)   # "a" is a stop word
            if is_number_caption and position == 1:
                assert int(row[1]) == five                                        # the only other seen number
            else:
                assert int(row[position]) in seen_content and int(row[position]) != int(source[position])


def test_inc_clip_uses_generated_negatives_in_the_memory_contrastive_term():
    model, tokenizer = tiny_clip()
    method = IncCLIP(model, tokenizer, replay_batch_size=4, task_loss="contrastive")
    method.before_task(classification_task(0, (0, 1)))
    for batch in digit_batches(tokenizer, (0, 1), 8, 2):
        method.after_step(batch, method.training_loss(batch))
    method.after_task(method.task)
    method.before_task(classification_task(1, (2, 3)))
    batch = digit_batches(tokenizer, (2, 3), 8, 1, seed=5)[0]
    generator_state, memory_state = method.generator.get_state(), method.replay.memory.generator.get_state()
    terms = method.training_loss(batch)
    # recompute by hand from the same draws: memory batch, negatives, contrastive with extended denominator
    method.generator.set_state(generator_state)
    method.replay.memory.generator.set_state(memory_state)
    replay = method.replay.draw(model, 8, 1)
    negatives = method.negative_generator.generate(replay["text"], 1, method.generator)
    with torch.no_grad():
        image = model.encode_image(torch.cat([batch["image"], replay["image"]]), normalize=True)
        text = model.encode_text(torch.cat([batch["text"], replay["text"]]), normalize=True)
        expected = clip_contrastive_loss(image, text, method.logit_scale, model.encode_text(negatives, normalize=True))
        without = clip_contrastive_loss(image, text, method.logit_scale)
    assert torch.allclose(terms["task"], expected, atol=1e-5)
    assert terms["task"] > without
    assert terms["distill"].abs() < 1e-6          # teacher = task-start model = student before any step


# ---- data parallelism: every worker holds the same memory ---------------------------------------
def _memory_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        memory = ReplayMemory(5, seed=7)
        for step in range(3):                 # global batch of 8 per step, this rank holds 4 of it
            start = step * 8 + rank * 4
            memory.offer_reservoir(sample_batch(range(start, start + 4)), task=0)
        drawn = memory.draw(3)["label"]
        model, tokenizer = tiny_clip()
        icarl = ICaRL(model, tokenizer, memory_size=6, herding_source="after_task_batches", herding_candidates=12)
        icarl.before_task(classification_task(0, (0, 1)))
        local = digit_batches(tokenizer, (0, 1), 6, 2, seed=rank)       # different data on each rank
        icarl.after_task(icarl.task, lambda: iter(local))
        torch.save({"memory": memory.state_dict(), "drawn": drawn, "icarl": icarl.replay.memory.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



def test_two_gloo_workers_hold_identical_memories_equal_to_one_process_on_the_global_stream(tmp_path):
    mp.spawn(_memory_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = ReplayMemory(5, seed=7)
    for step in range(3):
        single.offer_reservoir(sample_batch(range(step * 8, step * 8 + 8)), task=0, gathered=False)
    for r in ranks:
        for key in ("pixels", "text", "label", "task"):
            assert torch.equal(r["memory"]["samples"][key], single.samples[key])
            assert torch.equal(r["icarl"]["samples"][key], ranks[0]["icarl"]["samples"][key])
    assert r["memory"]["seen"] == 24
    # the two ranks replay disjoint slices of one global draw, the one a single process makes
    assert torch.equal(torch.cat([ranks[0]["drawn"], ranks[1]["drawn"]]), single.draw(6)["label"])
    # iCaRL selected on rank 0 (its own candidates) and broadcast the rows
    _, tokenizer = tiny_clip()
    rank0_pixels = torch.cat([b["pixels"] for b in digit_batches(tokenizer, (0, 1), 6, 2, seed=0)])
    stored = ranks[1]["icarl"]["samples"]["pixels"]
    assert all(any(torch.equal(row, candidate) for candidate in rank0_pixels) for row in stored)


def test_text_forward_from_token_embeddings_equals_encode_text():
    model, tokenizer = tiny_clip()
    tokens = tokenizer(["a red car", "three small dogs on a boat"])
    with torch.no_grad():
        assert torch.allclose(encode_text_embeddings(model, model.token_embedding(tokens), tokens),
                              model.encode_text(tokens, normalize=True), atol=1e-6)


def test_band_loss_by_hand_and_inversion_lands_negatives_inside_the_band():
    inversion = TokenEmbeddingInversion(steps=20, lr=0.05, margin_low=0.05, margin_high=0.3)
    # c⁺ = 0.9: band [0.6, 0.85]; 0.95 overshoots by 0.1, 0.5 undershoots by 0.1, 0.7 is inside
    assert inversion.band_loss(torch.tensor([0.95, 0.5, 0.7]), torch.tensor(0.9)).item() == pytest.approx(0.2)
    model, tokenizer = tiny_clip()
    batch = digit_batches(tokenizer, (0, 1), 4, 1)[0]
    negatives = inversion.negative_features(model, batch, 2, torch.Generator().manual_seed(0))
    assert negatives.shape == (8, 64) and negatives.requires_grad
    assert all(p.grad is None for p in model.parameters())          # inversion itself trains nothing
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True).repeat_interleave(2, 0)
        positive = (image * model.encode_text(batch["text"], normalize=True).repeat_interleave(2, 0)).sum(-1)
        gap = positive - (image * negatives).sum(-1)
    assert ((gap > 0.05 - 1e-3) & (gap < 0.3 + 1e-3)).all(), gap


def test_inc_clip_runs_with_the_inversion_generator():
    model, tokenizer = tiny_clip()
    method = IncCLIP(model, tokenizer, negative_generator="embedding_inversion", inversion_steps=2, replay_batch_size=2)
    method.before_task(classification_task(0, (0, 1)))
    batch = digit_batches(tokenizer, (0, 1), 4, 1)[0]
    method.after_step(batch, method.training_loss(batch))
    method.before_task(classification_task(1, (2, 3)))
    terms = method.training_loss(digit_batches(tokenizer, (2, 3), 4, 1)[0])
    assert set(terms) == {"loss", "task", "replay", "distill"} and torch.isfinite(terms["loss"])


# ---- ER's replay mix: CTP's buffer appended to the task's data ---------------------------------

def test_draw_replacing_replaces_a_binomial_share_of_the_rows():
    memory = ReplayMemory(10, seed=0)
    memory.offer_reservoir(sample_batch(range(10)), task=0, gathered=False)
    counts = []
    for _ in range(2000):
        positions, samples = memory.draw_replacing(8, 0.2, before_task=1)
        assert positions.numel() == samples["label"].numel() and positions.unique().numel() == positions.numel()
        assert ((positions >= 0) & (positions < 8)).all()
        counts.append(positions.numel())
    mean = sum(counts) / len(counts)
    variance = sum((c - mean) ** 2 for c in counts) / len(counts)
    assert abs(mean / 8 - 0.2) < 0.012                  # 4 sd of the mean share over 2000 steps
    assert abs(variance - 8 * 0.2 * 0.8) < 0.2          # Binomial(8, 0.2): variance 1.28
    assert memory.draw_replacing(8, 0.2, before_task=0) is None   # nothing of an earlier task


def hand_smoothed_ce(logits, target, smoothing=0.2):
    """(1 − ε)(−log p_y) + ε mean_c(−log p_c), plain Python (torch's label-smoothed CE)."""
    log_z = math.log(sum(math.exp(v) for v in logits))
    nll = [log_z - v for v in logits]
    return (1 - smoothing) * nll[target] + smoothing * sum(nll) / len(nll)


def er_after_one_task(**hparams):
    model, tokenizer = tiny_clip()
    method = ER(model, tokenizer, memory_size=10, **hparams)
    method.before_task(classification_task(0, (0, 1)))
    for batch in digit_batches(tokenizer, (0, 1), 5, 2):
        method.after_step(batch, method.training_loss(batch))
    method.after_task(method.task)
    return model, tokenizer, method


def test_er_appended_mix_replaces_rows_in_proportion_and_matches_a_hand_computation():
    model, tokenizer, method = er_after_one_task()
    method.before_task(classification_task(1, (2, 3), train_samples=40))
    assert method.replay.appended_share(method.task, "er") == pytest.approx(10 / (10 + 40))
    batch = digit_batches(tokenizer, (2, 3), 8, 1, seed=4)[0]
    state = method.replay.memory.generator.get_state()
    terms = method.training_loss(batch)
    method.replay.memory.generator.set_state(state)
    positions, samples = method.replay.memory.draw_replacing(8, 0.2, before_task=1)
    assert 0 < positions.numel() < 8
    cfg = model.visual.preprocess_cfg
    from methods.models import normalize_pixels
    images, labels, tasks = batch["image"].clone(), batch["label"].tolist(), [1] * 8
    images[positions] = normalize_pixels(samples["pixels"], cfg["mean"], cfg["std"])
    for position, label, task in zip(positions.tolist(), samples["label"].tolist(), samples["task"].tolist()):
        labels[position], tasks[position] = label, task
    prompts = {t: tokenizer([TEMPLATE.format(DIGIT_NAMES[c]) for c in classes]) for t, classes in ((0, (0, 1)), (1, (2, 3)))}
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        logits = {t: (model.logit_scale.exp() * image @ model.encode_text(p, normalize=True).t()).tolist()
                  for t, p in prompts.items()}
    current = sum(hand_smoothed_ce(logits[1][i], labels[i]) for i in range(8) if tasks[i] == 1) / 8
    remembered = sum(hand_smoothed_ce(logits[0][i], labels[i]) for i in range(8) if tasks[i] == 0) / 8
    assert terms["task"].item() == pytest.approx(current, rel=1e-5)
    assert terms["replay"].item() == pytest.approx(remembered, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(current + remembered, rel=1e-5)


def test_er_half_batch_mix_concatenates_a_full_memory_batch_and_appended_needs_train_samples():
    model, tokenizer, method = er_after_one_task(replay_mix="half_batch")
    method.before_task(classification_task(1, (2, 3), train_samples=0))
    batch = digit_batches(tokenizer, (2, 3), 8, 1, seed=4)[0]
    state = method.replay.memory.generator.get_state()
    terms = method.training_loss(batch)
    method.replay.memory.generator.set_state(state)
    replay = method.replay.draw(model, 8, 1)
    assert replay["label"].shape[0] == 8                           # as many memory rows as current ones
    with torch.no_grad():
        expected = method.replay.loss(model, replay, model.encode_image(replay["image"], normalize=True),
                                      model.logit_scale.exp(), 0.2)
    assert terms["replay"].item() == pytest.approx(expected.item(), rel=1e-5)
    _, _, appended = er_after_one_task()
    appended.before_task(classification_task(1, (2, 3), train_samples=0))
    with pytest.raises(ReplayMemoryError, match=r"TaskInfo\.train_samples.*half_batch"):
        appended.training_loss(batch)


def test_er_set_hparams_keeps_the_memory_budget_and_updates_the_mix():
    _, _, method = er_after_one_task()
    with pytest.raises(HparamError, match=r"method\.hparams\.memory_size cannot change"):
        method.set_hparams({"memory_size": 20})
    method.set_hparams({"memory_size": 10, "replay_batch_size": 3, "replay_current_task": True})
    assert method.replay.batch_size == 3 and not method.replay.previous_tasks_only and len(method.replay.memory) == 10


def test_icarl_zscl_budget_gives_the_new_task_k_minus_k_over_t_and_the_first_task_its_first_images():
    model, tokenizer = tiny_clip()
    method = ICaRL(model, tokenizer, memory_size=12, herding_candidates=20, replay_batch_size=4, budget="zscl",
                   first_task_herding=False)
    expected_counts = [[12], [6, 6], [4, 4, 8]]      # K; K//2 + (K − K//2); 2·(K//3) + (K − K//3) = 16 > K
    for index, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        method.before_task(classification_task(index, classes, num_tasks=3))
        batches = digit_batches(tokenizer, classes, 10, 2, seed=index)
        for batch in batches:
            method.after_step(batch, method.training_loss(batch))
        method.after_task(method.task)
        assert torch.bincount(method.replay.memory.samples["task"]).tolist() == expected_counts[index]
        if index == 0:   # ZSCL: the first K training images, in stream order, no herding
            first = torch.cat([b["pixels"] for b in batches])[:12]
            assert torch.equal(method.replay.memory.samples["pixels"], first)
