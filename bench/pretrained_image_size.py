"""What image size EffLite0-MiniLM can afford on this machine: milliseconds per training step.

    python bench/pretrained_image_size.py --sizes 64 96 128 --batch 32 --steps 5

For each size: a full continual-learning step (every weight trained: forward of both towers, CLIP
loss, backward, AdamW), and the frozen trunk's forward alone (what LiT pays once per image to
cache features). Once: a LiT step (image head, text tower and projections on cached features),
which does not depend on the image size. The images are random pixels, the captions real-length
sentences. Sizes are measured in interleaved rounds after a warm-up round and each reports its
fastest round: on a machine shared with other jobs the fastest is the least disturbed estimate.
Beside wall time it prints the process's CPU time per step, which contention inflates less.
"""
from __future__ import annotations

import argparse
import time

import torch

CAPTIONS = ["an emoji of a fox face: fox, face, animal", "a photo of a blue truck.", "a badger.",
            "a drawing of a red apple", "a handwritten seven.", "a photo of an ankle boot."]


def timed_ms(step) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def fastest_rounds(steps: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Every step once per round (round 0 warms up); per step the fastest wall time and its CPU time."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            timing = timed_ms(step)
            if round_index:
                results[name].append(timing)
    return {name: min(timings) for name, timings in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from methods.losses import clip_contrastive_loss
    from methods.models import build_model

    built = build_model("EffLite0-MiniLM")
    model = built.model
    texts = built.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    print(f"EffLite0-MiniLM, batch {args.batch}, context {texts.shape[1]}, {torch.get_num_threads()} threads")
    steps = {}
    for size in args.sizes:
        images = torch.randn(args.batch, 3, size, size)

        def full_step(images=images):
            model.train()
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(texts, normalize=True)
            loss = clip_contrastive_loss(image_features, text_features, model.logit_scale.exp())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        @torch.no_grad()
        def trunk_forward(images=images):
            model.visual.trunk.eval()
            model.visual.trunk(images)

        steps[f"full-{size}"] = full_step
        steps[f"trunk-{size}"] = trunk_forward

    features = torch.randn(args.batch, model.visual.head.proj.in_features)
    lit_parameters = [p for n, p in model.named_parameters() if not n.startswith("visual.trunk.")]
    lit_optimizer = torch.optim.AdamW(lit_parameters, lr=1e-5)

    def lit_step():
        model.text.train()
        image_features = torch.nn.functional.normalize(model.visual.head(features), dim=-1)
        text_features = model.encode_text(texts, normalize=True)
        loss = clip_contrastive_loss(image_features, text_features, model.logit_scale.exp())
        loss.backward()
        lit_optimizer.step()
        lit_optimizer.zero_grad(set_to_none=True)

    steps["lit"] = lit_step
    best = fastest_rounds(steps, args.steps)
    print(f"{'px':>5} {'full step ms':>13} {'(cpu ms)':>9} {'trunk fwd ms':>13} {'(cpu ms)':>9} {'trunk ms/img':>13}")
    for size in args.sizes:
        (full, full_cpu), (trunk, trunk_cpu) = best[f"full-{size}"], best[f"trunk-{size}"]
        print(f"{size:>5} {full:>13.0f} {full_cpu:>9.0f} {trunk:>13.0f} {trunk_cpu:>9.0f} {trunk / args.batch:>13.2f}")
    lit, lit_cpu = best["lit"]
    print(f"LiT step on cached features (any px): {lit:.0f} ms (cpu {lit_cpu:.0f} ms)")


if __name__ == "__main__":
    main()
