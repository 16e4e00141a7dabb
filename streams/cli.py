"""`vlcl streams build ...` and `vlcl streams check MANIFEST`.

Registered by the main CLI through `add_streams_commands(subparsers)`. Heavy imports (PIL,
sklearn, webdataset) happen inside the handlers so `vlcl --help` stays fast. Each handler returns
the process exit code.
"""
from __future__ import annotations

import argparse


SUBSET_HELP = "0 = all"
RECIPE_COMMANDS = [
    ("split-fmnist", "Fashion-MNIST, 5 class-incremental tasks of 2 classes (needs dataset-fashion-mnist)",
     [("train_per_class", 1000, "train images per class, the first of the train file"),
      ("eval_per_class", 200, "eval images per class, the first of the test file")]),
    ("mini-mtil", "Fashion-MNIST -> digits -> 3 emoji categories -> Tux Paint retrieval, with an emoji line-art "
                  "control set (needs the sources of streams/install_sources.sh)",
     [("train_per_class", 300, "Fashion-MNIST and digits train images per class (digits: at most 400)"),
      ("eval_per_class", 100, "Fashion-MNIST and digits eval images per class (digits: at most 100)"),
      ("emoji_per_task", 0, f"emoji concepts per emoji task, in emoji order ({SUBSET_HELP})"),
      ("stamps_per_category", 0, f"Tux Paint stamps per category, in path order ({SUBSET_HELP})")]),
    ("offline-pretrain", "image-caption pairs for a LiT alignment stage, disjoint from mini-mtil (emoji of other "
                         "categories, other Tux Paint stamps)",
     [("emoji_per_category", 0, f"emoji concepts per emoji category ({SUBSET_HELP})"),
      ("stamps_per_category", 0, f"Tux Paint stamps per category ({SUBSET_HELP})")]),
]


def add_streams_commands(subparsers) -> argparse.ArgumentParser:
    streams = subparsers.add_parser("streams", help="build and check streams (tasks as webdataset shards)")
    commands = streams.add_subparsers(dest="streams_command", required=True)

    build = commands.add_parser("build", help="write a stream's shards and manifest")
    sources = build.add_subparsers(dest="source", required=True)

    digits = sources.add_parser("digits", help="the built-in digits stream (scikit-learn, no download)")
    digits.add_argument("--data-root", help="where built-in streams live (default $VLCL_DATA_DIR or ~/.cache/vlcl)")
    digits.set_defaults(func=run_build_digits)

    # Recipes over packaged offline data (streams/recipes.py). Their option lists are static here so
    # `vlcl --help` need not import PIL or numpy; tests/test_streams_recipes.py checks they match.
    for name, summary, options in RECIPE_COMMANDS:
        recipe = sources.add_parser(name, help=summary)
        recipe.add_argument("--out", help="folder for the shards and manifest.yaml (default: the data root, "
                                          "as builtin:%s uses it; only with default options)" % name)
        recipe.add_argument("--data-root", help="where built-in streams live (default $VLCL_DATA_DIR or ~/.cache/vlcl)")
        recipe.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
        for option, default, help_text in options:
            recipe.add_argument(f"--{option.replace('_', '-')}", dest=option, type=int, default=default,
                                help=f"{help_text} (default {default})")
        recipe.set_defaults(func=run_build_recipe, recipe=name, recipe_options=[o[0] for o in options])

    def common(parser):
        parser.add_argument("--out", required=True, help="folder for the shards and manifest.yaml")
        parser.add_argument("--name", help="stream name (default: from the source)")
        parser.add_argument("--template", action="append", dest="templates",
                            help="prompt template with {} (repeat for several; default 'a photo of a {}.')")
        parser.add_argument("--eval-fraction", type=float, default=0.2, help="share of samples for eval (default 0.2)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the key hash that splits train/eval")
        parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        parser.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")

    folder = sources.add_parser("imagefolder", help="ROOT/<class>/<image>, classes cut into tasks in sorted order")
    folder.add_argument("root")
    common(folder)
    folder.add_argument("--classes-per-task", type=int, help="classes per task (default: all in one task)")
    folder.add_argument("--eval-classifier", choices=["task", "stream"], default="stream",
                        help="zero-shot over the task's classes or all classes of the stream (default stream)")
    folder.set_defaults(func=run_build_imagefolder)

    table = sources.add_parser("table", help="CSV or JSONL of image path, caption[, label][, task]")
    table.add_argument("table")
    common(table)
    for column, default in (("image", "image"), ("caption", "caption"), ("label", "label"), ("task", "task")):
        table.add_argument(f"--{column}-column", default=default, help=f"column name (default {default})")
    table.add_argument("--eval-classifier", choices=["task", "stream"], default="task")
    table.set_defaults(func=run_build_table)

    shards = sources.add_parser("img2dataset", help="existing img2dataset shards, one --task per task")
    common(shards)
    shards.add_argument("--task", action="append", nargs="+", required=True, metavar="NAME TRAIN [EVAL]",
                        help="task name, train shard pattern and optionally eval shard pattern "
                             "(without it the samples are re-split by key hash)")
    shards.add_argument("--classes", action="append", metavar="TASK=a,b,c", default=[],
                        help="class names of a task whose samples carry only integer labels")
    shards.add_argument("--copy", action="store_true", help="copy the given shards instead of pointing at them")
    shards.add_argument("--eval-classifier", choices=["task", "stream"], default="task")
    shards.set_defaults(func=run_build_img2dataset)

    mtil = sources.add_parser("mtil", help="MTIL (ZSCL): 11 torchvision datasets from disk, one task each, in "
                                           "Order I or II, scored over each task's own classes")
    mtil.add_argument("--root", required=True, help="folder holding the datasets as torchvision keeps them "
                                                    "(the `root` of every torchvision class; download=False)")
    mtil.add_argument("--out", required=True, help="folder for the shards and manifest.yaml")
    mtil.add_argument("--order", choices=["I", "II"], default="I", help="task order of manifest.yaml (default I; "
                      "manifest-order-I.yaml and manifest-order-II.yaml are written too, over the same shards)")
    mtil.add_argument("--few-shot", type=int, metavar="N", help="N training images per class, seeded (default all)")
    mtil.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw (default 0)")
    mtil.add_argument("--control", action="append", choices=["cifar10"], default=[],
                      help="zero-shot-only control set, scored after every task, never trained (cifar10)")
    mtil.add_argument("--tasks", help="comma-separated subset of the 11 datasets (default all; for smoke tests)")
    mtil.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    mtil.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
    mtil.set_defaults(func=run_build_mtil)

    reference = sources.add_parser("reference", help="reference image-text pairs for data.reference (ZSCL): images "
                                                     "from a class-folder tree, captions paired at random")
    reference.add_argument("--images", required=True, help="image folder of class folders (ImageNet train: "
                                                           "DIR/<wnid>/<image>.JPEG)")
    reference.add_argument("--captions", required=True, help="CC3M's TSV (caption<TAB>url, no header) or a .txt "
                                                             "with one caption per line")
    reference.add_argument("--out", required=True, help="folder for the shards, manifest.yaml and captions.txt")
    reference.add_argument("--samples", type=int, help="images drawn from the folder, seeded (default all)")
    reference.add_argument("--seed", type=int, default=0, help="seed of the image draw and the random pairing")
    reference.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    reference.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
    reference.set_defaults(func=run_build_reference)

    karpathy = sources.add_parser("karpathy", help="COCO / Flickr30K from the Karpathy split JSON: test split as "
                                                   "eval, training images cut into contiguous chunks (Mod-X phases)")
    karpathy.add_argument("json", help="dataset_coco.json or dataset_flickr30k.json")
    karpathy.add_argument("--images", required=True, help="image root: an image is IMAGES/[filepath/]filename")
    karpathy.add_argument("--out", required=True, help="folder for the shards and manifest.yaml")
    karpathy.add_argument("--chunks", type=int, default=1, help="tasks the training images are cut into, in JSON "
                                                                "order (default 1; Mod-X: 5)")
    karpathy.add_argument("--train-splits", default="train,restval",
                          help="Karpathy splits trained on (default train,restval; Mod-X Flickr30K: train,val)")
    karpathy.add_argument("--test-split", default="test", help="split evaluated (default test: COCO 5K, Flickr 1K)")
    karpathy.add_argument("--control", nargs=2, metavar=("JSON", "IMAGES"),
                          help="another Karpathy JSON and image root whose test split is a control set")
    karpathy.add_argument("--name", help="stream/task name (default: the JSON's `dataset`)")
    karpathy.add_argument("--seed", type=int, default=0, help="seed of each training image's caption draw")
    karpathy.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    karpathy.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
    karpathy.set_defaults(func=run_build_karpathy)

    p9d = sources.add_parser("p9d", help="P9D (CTP): 9 industries as retrieval tasks, from the released json/ and "
                                         "image folders")
    p9d.add_argument("root", help="P9D folder: json/{train,test}.json, train_images/, gallery_images/")
    p9d.add_argument("--out", required=True, help="folder for the shards and manifest.yaml")
    p9d.add_argument("--order", choices=["default", "reverse"], default="default",
                     help="CTP's order (household ... electronics) or reversed")
    p9d.add_argument("--train-images", help="train image folder (default ROOT/train_images)")
    p9d.add_argument("--test-images", help="test image folder (default ROOT/gallery_images, as CTP's config)")
    p9d.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p9d.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
    p9d.set_defaults(func=run_build_p9d)

    cc3m = sources.add_parser("cc3m", help="img2dataset shards (CC3M) cut into tasks by instance, or by class "
                                           "(OUR PROPOSAL: the paper's class split is not public)")
    cc3m.add_argument("shards", nargs="+", help="img2dataset shard paths, globs or brace patterns")
    cc3m.add_argument("--out", required=True, help="folder for the shards and manifest.yaml")
    cc3m.add_argument("--tasks", type=int, required=True, help="number of tasks")
    cc3m.add_argument("--split", choices=["instance", "class"], required=True,
                      help="instance: by seeded key hash; class (our proposal): each caption gets the class of "
                           "--classes occurring earliest in it, classes cut into contiguous groups, unmatched left out")
    cc3m.add_argument("--classes", help="class list for --split class: one per line, optionally 'name: syn, syn'")
    cc3m.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of each task (default 0.05)")
    cc3m.add_argument("--seed", type=int, default=0, help="seed of the key hashes")
    cc3m.add_argument("--name", default="cc3m", help="stream name prefix (default cc3m)")
    cc3m.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    cc3m.add_argument("--overwrite", action="store_true", help="replace a stream already in --out")
    cc3m.set_defaults(func=run_build_cc3m)

    check = commands.add_parser("check", help="read every shard; print a summary and each problem (exit 1 if any)")
    check.add_argument("manifest", help="manifest YAML path or builtin:<name>")
    check.add_argument("--no-decode", action="store_true", help="skip decoding images (faster)")
    check.add_argument("--data-root", help="where built-in streams live")
    check.set_defaults(func=run_check)
    return streams


def run_build_digits(args) -> int:
    from streams.builtin import materialize_builtin

    print(materialize_builtin("digits", args.data_root))
    return 0


def run_build_recipe(args) -> int:
    import time

    from streams.recipes import RECIPES, build_recipe, describe_build

    options = {o: getattr(args, o) for o in args.recipe_options}
    started = time.perf_counter()
    if args.out is None:
        defaults = RECIPES[args.recipe].options
        changed = sorted(o for o, v in options.items() if v != defaults[o])
        if changed:
            from streams.errors import SourceError

            raise SourceError(f"options {', '.join('--' + o.replace('_', '-') for o in changed)} differ from the "
                              f"defaults, so the stream cannot live at builtin:{args.recipe}; give --out DIR")
        from streams.builtin import materialize_builtin

        manifest = materialize_builtin(args.recipe, args.data_root)
    else:
        manifest = build_recipe(args.recipe, args.out, overwrite=args.overwrite, **options)
    print("\n".join(describe_build(manifest)))
    print(f"{manifest} ({time.perf_counter() - started:.1f} s)")
    return 0


def run_build_imagefolder(args) -> int:
    from streams.converters import from_image_folder

    print(from_image_folder(args.root, args.out, name=args.name, classes_per_task=args.classes_per_task,
                            templates=args.templates, eval_fraction=args.eval_fraction, seed=args.seed,
                            eval_classifier=args.eval_classifier, max_samples_per_shard=args.shard_size,
                            overwrite=args.overwrite))
    return 0


def run_build_table(args) -> int:
    from streams.converters import from_table

    print(from_table(args.table, args.out, name=args.name, image_column=args.image_column,
                     caption_column=args.caption_column, label_column=args.label_column,
                     task_column=args.task_column, templates=args.templates, eval_fraction=args.eval_fraction,
                     seed=args.seed, eval_classifier=args.eval_classifier, max_samples_per_shard=args.shard_size,
                     overwrite=args.overwrite))
    return 0


def parse_task_arguments(values: list[list[str]], class_lists: list[str]):
    from streams.errors import SourceError

    tasks = []
    for value in values:
        if len(value) not in (2, 3):
            raise SourceError(f"--task takes NAME TRAIN [EVAL], got {value}")
        tasks.append((value[0], value[1], value[2] if len(value) == 3 else None))
    classes = {}
    for item in class_lists:
        task, sep, names = item.partition("=")
        if not sep or not names:
            raise SourceError(f"--classes takes TASK=a,b,c, got {item!r}")
        classes[task] = [n.strip() for n in names.split(",")]
    return tasks, classes


def run_build_img2dataset(args) -> int:
    from streams.converters import from_img2dataset

    tasks, classes = parse_task_arguments(args.task, args.classes)
    print(from_img2dataset(tasks, args.out, name=args.name or "img2dataset", classes=classes,
                           templates=args.templates, eval_fraction=args.eval_fraction, seed=args.seed,
                           copy=args.copy, eval_classifier=args.eval_classifier,
                           max_samples_per_shard=args.shard_size, overwrite=args.overwrite))
    return 0


def run_check(args) -> int:
    from streams.builtin import open_stream
    from streams.check import check_stream

    report = check_stream(open_stream(args.manifest, args.data_root)[1], decode_images=not args.no_decode)
    print("\n".join(report.summary_lines()))
    return 0 if report.ok else 1


def run_build_mtil(args) -> int:
    import time

    from streams.mtil import build_mtil

    started = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    manifest = build_mtil(args.root, args.out, order=args.order, few_shot=args.few_shot, seed=args.seed,
                          controls=args.control, tasks=tasks, shard_size=args.shard_size, overwrite=args.overwrite,
                          progress=print)
    print(f"{manifest} ({time.perf_counter() - started:.1f} s)")
    return 0


def run_build_reference(args) -> int:
    from streams.protocols import build_reference

    print(build_reference(args.images, args.captions, args.out, samples=args.samples, seed=args.seed,
                          shard_size=args.shard_size, overwrite=args.overwrite))
    return 0


def run_build_karpathy(args) -> int:
    from streams.protocols import from_karpathy

    print(from_karpathy(args.json, args.images, args.out, chunks=args.chunks,
                        train_splits=[s.strip() for s in args.train_splits.split(",") if s.strip()],
                        test_split=args.test_split, name=args.name,
                        control=tuple(args.control) if args.control else None,
                        seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite))
    return 0


def run_build_p9d(args) -> int:
    from streams.protocols import from_p9d

    print(from_p9d(args.root, args.out, order=args.order, train_images=args.train_images,
                   test_images=args.test_images, shard_size=args.shard_size, overwrite=args.overwrite))
    return 0


def run_build_cc3m(args) -> int:
    from streams.protocols import from_cc3m

    print(from_cc3m(args.shards, args.out, tasks=args.tasks, split=args.split, classes_file=args.classes,
                    eval_fraction=args.eval_fraction, seed=args.seed, name=args.name, shard_size=args.shard_size,
                    overwrite=args.overwrite))
    return 0
