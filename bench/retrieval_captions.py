"""One caption per image vs all five: the same model's recalls on a real multi-caption eval set.

The eval set is scikit-learn's handwritten digits laid out as a Karpathy split JSON (COCO and
Flickr30K's format: five sentences per image, here the five digit prompts of the built-in stream)
and converted by `vlcl streams build karpathy`'s converter. A tiny CLIP is trained from scratch on
the train split with fine-tuning's contrastive loss (plain PyTorch loop over the method module),
then scored twice on the test split: one-to-one (each image's first caption only, as a stream
without a `captions` list is scored) and the papers' protocol (every caption: image->text is a hit
when any of the image's captions is in the top K; text->image ranks each caption's image).

    .venv/bin/python bench/retrieval_captions.py             # 300 steps, about 1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def karpathy_digits(folder: Path, test_images: int) -> tuple[Path, Path]:
    """(dataset_digits.json, image root): every digit as a 32 px PNG with its five captions."""
    from sklearn.datasets import load_digits

    from streams.builtin import DIGIT_NAMES, DIGIT_TEMPLATES, digit_image

    digits = load_digits()
    images = folder / "images"
    images.mkdir(parents=True)
    entries = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        name = f"digit{index:04d}.png"
        digit_image(pixels).save(images / name)
        sentences = [{"raw": t.format(DIGIT_NAMES[label])} for t in DIGIT_TEMPLATES]
        # every 6th image is a test image: all ten digits in both splits
        split = "test" if index % 6 == 0 and index // 6 < test_images else "train"
        entries.append({"filename": name, "imgid": index, "split": split, "sentences": sentences})
    path = folder / "dataset_digits.json"
    path.write_text(json.dumps({"images": entries, "dataset": "digits"}))
    return path, images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from methods import get_method
    from methods.base import TaskInfo, batch_from_pixels
    from methods.models import TokenizerFactory, build_model
    from orchestrator.evaluation import recalls_from_features, retrieval_features
    from streams.local_reader import read_split
    from streams.manifest import load_stream
    from streams.protocols import from_karpathy
    from streams.samples import RowDecoder

    torch.manual_seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="vlcl-retrieval-captions-"))
    json_path, image_root = karpathy_digits(folder, args.test_images)
    spec = load_stream(from_karpathy(json_path, image_root, folder / "stream", chunks=1))
    [task] = spec.tasks
    built = build_model("vlcl-tiny")
    tokens = TokenizerFactory("vlcl-tiny")
    train = read_split(spec.shard_urls(task.train), RowDecoder(built.image_size, tokens, []))
    test = read_split(spec.shard_urls(task.eval), RowDecoder(built.image_size, tokens, [], all_captions=True))

    method = get_method("finetune")(built.model, built.tokenizer)
    method.before_task(TaskInfo(index=0, name=task.name, kind="retrieval", num_tasks=1, steps=args.steps))
    optimizer = torch.optim.AdamW(built.model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    built.model.train()
    for step in range(args.steps):
        rows = torch.randint(len(train), (args.batch,), generator=generator)
        batch = batch_from_pixels(train.pixels[rows].permute(0, 3, 1, 2), train.text[rows], train.label[rows],
                                  built.image_mean, built.image_std)
        loss = method.training_loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    built.model.eval()
    batches = [test.rows(slice(i, i + 256)) for i in range(0, len(test), 256)]
    for batch in batches:
        batch["pixels"] = batch["pixels"].permute(0, 3, 1, 2)
    images, every_caption, caption_image = retrieval_features(built.model, batches, built.image_mean,
                                                              built.image_std, "cpu")
    one = recalls_from_features(images, every_caption[_first_of_each(caption_image)])
    five = recalls_from_features(images, every_caption, caption_image)
    print(f"digits as a Karpathy split: {len(train)} train images, {len(test)} test images x 5 captions; "
          f"vlcl-tiny from scratch, {args.steps} steps at batch {args.batch} ({time.time() - started:.0f} s), "
          f"final loss {loss.item():.3f}")
    print(f"{'':22}{'i2t R@1':>9}{'i2t R@5':>9}{'t2i R@1':>9}{'t2i R@5':>9}{'r_mean':>9}")
    for name, result in (("one caption per image", one), ("all five captions", five)):
        print(f"{name:22}" + "".join(f"{100 * result[k]:9.1f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "r_mean")))
    return 0


def _first_of_each(caption_image):
    import torch

    first = torch.ones_like(caption_image, dtype=torch.bool)
    first[1:] = caption_image[1:] != caption_image[:-1]
    return first


if __name__ == "__main__":
    sys.exit(main())
