"""Every shipped protocol config (examples/mtil, examples/modx, examples/ctp) runs: its streams are
built from the small real layouts the protocol tests make (MTIL's torchvision folders, Karpathy JSON
for Flickr30K + COCO, the P9D release, ZSCL's reference folder + caption list), into the `data/`
paths the configs name, and `vlcl run <config>` runs in a subprocess from that folder.

The overrides are the ones a laptop needs and nothing else: a tiny model from scratch, 2 steps per
task at batch 2, eval capped at 16 samples, one worker (the configs ask for 4 GPUs). The MTIL
layouts hold 4 of the 11 datasets, so the MTIL configs' per-task learning rates keep the one of
those 4 (MNIST's)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from streams.builtin import DIGIT_NAMES, digit_image
from streams.mtil import build_mtil
from streams.protocols import build_reference, from_karpathy, from_p9d
from test_streams_protocols_mtil import FOUR, mtil_root  # noqa: F401  (the MTIL layouts fixture)
from test_streams_protocols_retrieval import karpathy_json, write_p9d_release

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(p for folder in ("mtil", "modx", "ctp") for p in (EXAMPLES / folder).glob("*.yaml"))
LAPTOP = ["model.name=vlcl-tiny", "model.pretrained=null", "train.max_steps_per_task=2", "train.batch_size=2",
          "train.num_workers=1", "data.eval_max_samples=16"]
MTIL_PER_TASK = "per_task={mnist: {train.lr: 5.0e-5}}"


@pytest.fixture(scope="module")
def protocol_folder(tmp_path_factory, mtil_root):  # noqa: F811
    """A folder whose data/ holds every stream the example configs read, built by vlcl's builders."""
    from sklearn.datasets import load_digits

    work = tmp_path_factory.mktemp("protocols")
    digits = load_digits()
    photos = []  # (caption, path) of 48 real digit photos in even/ and odd/ folders
    for index in range(48):
        label = int(digits.target[index])
        path = work / "photos" / ("even" if label % 2 == 0 else "odd") / f"digit{index:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        digit_image(digits.images[index]).resize((48, 48)).save(path, quality=85)
        photos.append((f"A {DIGIT_NAMES[label]}, handwritten (number {index}).", path))
    photo_root = work / "photos"

    build_mtil(mtil_root, work / "data" / "mtil", tasks=FOUR)
    captions = work / "captions.txt"
    captions.write_text("".join(f"{c}\n" for c, _ in photos))
    build_reference(photo_root, captions, work / "data" / "zscl-reference", samples=32)
    # Flickr30K: 20 train+val images in 5 phases and 4 test; COCO's test split as the control set.
    splits = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    flickr = karpathy_json(work / "dataset_flickr30k.json", [(c, p.relative_to(photo_root), s) for (c, p), s
                                                             in zip(photos[:24], splits)], "flickr30k", True)
    coco = karpathy_json(work / "dataset_coco.json", [(c, p.relative_to(photo_root), "test") for c, p
                                                      in photos[24:30]], "coco", True)
    from_karpathy(flickr, photo_root, work / "data" / "modx-flickr", chunks=5, train_splits=["train", "val"],
                  control=(str(coco), str(photo_root)))
    from_p9d(write_p9d_release(work / "Product9D", photos[30:45]), work / "data" / "p9d")
    return work


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_protocol_config_runs(config, protocol_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # one MLflow store for all (its tables are made once: ~4 s a fresh store)
    uri = f"sqlite:///{protocol_folder / 'mlflow.db'}"
    overrides = LAPTOP + [f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}"]
    if config.parent.name == "mtil":
        overrides.append(MTIL_PER_TASK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(config),
                           *(arg for item in overrides for arg in ("--set", item))],
                          cwd=protocol_folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    print(f"{config.parent.name}/{config.name}: {time.time() - started:.1f} s")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "vlcl-tiny"
    assert run.data.params["train.max_steps_per_task"] == "2"
    matrix = json.loads(Path(client.download_artifacts(run.info.run_id, "matrix.json", str(tmp_path))).read_text())
    assert len(matrix["rows"]) == len(matrix["tasks"]) + 1  # zero-shot row + one per task
    assert run.data.params["method.name"] == yaml.safe_load(config.read_text())["method"]["name"]
