"""Evaluation metrics against hand computations."""
import pytest
import torch

from orchestrator.evaluation import class_text_embeddings, recalls_from_similarity, zero_shot_accuracy


def test_recalls_by_hand():
    # image 0: match ranks 1st; image 1: its match is 2nd; image 2: 3rd.
    sim = torch.tensor([[0.9, 0.1, 0.0],
                        [0.8, 0.5, 0.1],
                        [0.7, 0.6, 0.2]])
    r = recalls_from_similarity(sim)
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r5"] == 1.0
    # text->image: column 0 best is image 0 (rank 0); column 1: 0.6 vs 0.1,0.5 -> rank 0? values [0.1,0.5,0.6]:
    # true match image 1 (0.5) has one higher (0.6) -> rank 1; column 2: [0.0,0.1,0.2] -> rank 0
    assert r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["score"] == r["r_mean"]
    assert r["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 2 / 3 + 1 + 1) / 6)


def test_five_caption_recalls_by_hand_with_duplicated_captions():
    # 3 images, 5 captions: image 0 owns captions 0-1, image 1 owns 2-3, image 2 owns 4. Captions 1
    # and 2 are the same text (their columns are equal), as "a man riding a horse" recurs in COCO.
    caption_image = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([[0.2, 0.9, 0.9, 0.1, 0.0],
                        [0.8, 0.7, 0.7, 0.6, 0.5],
                        [0.3, 0.4, 0.4, 0.2, 0.1]])
    r = recalls_from_similarity(sim, caption_image)
    # i2t, by the image's best own caption: image 0's caption 1 (0.9; caption 2 only ties) ranks 1st;
    # image 1's best own (0.7) has caption 0 above it: 2nd; image 2's only caption (0.1) is 5th.
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r5"] == 1.0
    # t2i, every caption's own image among the 3: caption 0 -> image 0 is 3rd; 1 -> 1st; 2 -> 2nd
    # (the duplicate scores image 0 higher); 3 -> 1st; 4 -> 2nd.
    assert r["t2i_r1"] == pytest.approx(2 / 5) and r["t2i_r5"] == 1.0
    assert r["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 2 / 5 + 1 + 1) / 6)
    assert (r["samples"], r["captions"]) == (3, 5)
    # One caption per image (the first of each): no image's caption and no caption's image is on top.
    first = recalls_from_similarity(sim[:, [0, 2, 4]])
    assert first["i2t_r1"] == 0 and first["t2i_r1"] == 0 and first["i2t_r5"] == 1.0


def test_chunked_feature_ranking_equals_the_whole_matrix(monkeypatch):
    from orchestrator import evaluation

    generator = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    caption_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 6, 6])
    texts = torch.nn.functional.normalize(images[caption_image] + torch.randn(13, 4, generator=generator), dim=-1)
    whole = recalls_from_similarity(images @ texts.t(), caption_image)
    monkeypatch.setattr(evaluation, "RANK_CHUNK", 3)  # uneven chunks of images and of captions
    assert evaluation.recalls_from_features(images, texts, caption_image) == whole
    assert 0 < whole["r_mean"] < 1


class _Identity(torch.nn.Module):
    """encode_image returns the flattened first pixel row; encode_text one-hot of the first token."""

    def encode_image(self, x, normalize=True):
        f = x[:, 0, 0, :2]
        return torch.nn.functional.normalize(f, dim=-1)

    def encode_text(self, tokens, normalize=True):
        f = torch.nn.functional.one_hot(tokens[:, 0] % 2, 2).float()
        return torch.nn.functional.normalize(f, dim=-1)


def test_zero_shot_accuracy_with_label_map():
    classifier = torch.eye(2)
    pixels = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    pixels[0, 0, 0, 0] = 255  # -> class 0
    pixels[1, 0, 0, 1] = 255  # -> class 1
    pixels[2, 0, 0, 0] = 255  # -> class 0
    pixels[3, 0, 0, 1] = 255  # -> class 1
    labels = torch.tensor([1, 0, 1, 1])  # task-local; map 0->1, 1->0 gives [0,1,0,0]
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    out = zero_shot_accuracy(_Identity(), classifier, [{"pixels": pixels, "label": labels}], mean, std, "cpu",
                             label_map=torch.tensor([1, 0]))
    assert out["top1"] == pytest.approx(3 / 4)


def test_class_embeddings_average_templates():
    model = _Identity()
    tokenizer = lambda prompts: torch.tensor([[len(p)] for p in prompts])  # noqa: E731
    emb = class_text_embeddings(model, tokenizer, ["a", "bb"], ["{}", "x{}"], "cpu")
    # "a"->len1 (odd), "xa"->len2 (even): mean of the two one-hots, renormalised
    assert torch.allclose(emb[0], torch.tensor([0.7071, 0.7071]), atol=1e-4)
    assert emb.shape == (2, 2)


def _sharded_eval_worker(rank: int, port: int, out_dir: str, features: tuple, labels) -> None:
    import os

    import torch.distributed as dist

    from methods.distributed import all_reduce_sum, gather_ragged_rows
    from orchestrator.evaluation import gather_retrieval_features, recalls_from_features

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        images, texts = features
        share = slice(0, 5) if rank == 0 else slice(5, None)    # uneven shares, as equal=False cuts them
        gathered = recalls_from_similarity(gather_ragged_rows(images[share]) @ gather_ragged_rows(texts[share]).t())
        empty = gather_ragged_rows(images[:3] if rank == 0 else images[:0])  # a worker with no rows
        counts = all_reduce_sum(torch.tensor([int(labels[share].sum()), len(labels[share])]))
        # two captions per image: each worker holds its images' captions, numbered from its first image
        mine = torch.arange(7)[share]
        captions = torch.cat([texts[mine], texts.flip(0)[mine]])
        owners = torch.cat([mine, mine]) - mine[0]
        multi = recalls_from_features(*gather_retrieval_features(images[share], captions, owners))
        torch.save({"recalls": gathered, "empty": empty, "counts": counts, "multi": multi},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_workers_scoring_uneven_shares_give_the_whole_set_scores(tmp_path):
    import torch.multiprocessing as mp

    from method_helpers import free_port

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(7, 4, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(7, 4, generator=generator), dim=-1)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    mp.spawn(_sharded_eval_worker, args=(free_port(), str(tmp_path), (images, texts), labels), nprocs=2, join=True)
    whole = recalls_from_similarity(images @ texts.t())
    assert 0 < whole["r_mean"] < 1
    multi_texts = torch.cat([texts, texts.flip(0)])
    multi_whole = recalls_from_similarity(images @ multi_texts.t(), torch.cat([torch.arange(7), torch.arange(7)]))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["recalls"] == pytest.approx(whole)
        assert torch.equal(got["empty"], images[:3])
        assert got["counts"].tolist() == [4, 7]
        assert got["multi"] == pytest.approx(multi_whole) and got["multi"]["captions"] == 14


def test_an_empty_eval_set_is_an_error_that_names_it():
    from orchestrator.evaluation import accuracy_from_counts, recalls_from_features

    with pytest.raises(ValueError, match="the eval set of task 'cars' has no readable sample"):
        accuracy_from_counts(0, 0, "the eval set of task 'cars'")
    with pytest.raises(ValueError, match="the eval set of task 'captions' has no readable sample"):
        recalls_from_features(torch.zeros(0, 0), torch.zeros(0, 0), eval_set="the eval set of task 'captions'")


def test_the_union_of_seen_sets_is_one_gallery_with_each_sets_captions_kept_on_its_images():
    from orchestrator.evaluation import recalls_from_features, union_of

    generator = torch.Generator().manual_seed(2)

    def eval_set(images: int, caption_image: list[int]):
        image_features = torch.nn.functional.normalize(torch.randn(images, 4, generator=generator), dim=-1)
        owners = torch.tensor(caption_image)
        noisy = image_features[owners] + torch.randn(len(owners), 4, generator=generator)
        return image_features, torch.nn.functional.normalize(noisy, dim=-1), owners

    first, second = eval_set(3, [0, 0, 1, 2]), eval_set(2, [0, 1, 1])
    images, texts, owners = union_of([first, second])
    assert owners.tolist() == [0, 0, 1, 2, 3, 4, 4]  # the second set's captions follow its images
    whole = torch.cat([first[0], second[0]]) @ torch.cat([first[1], second[1]]).t()
    assert recalls_from_features(images, texts, owners) == recalls_from_similarity(whole, owners)
