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
