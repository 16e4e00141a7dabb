"""A retrieval stream end to end through `vlcl run`: real images with five captions each (scikit-learn's
handwritten digits, 0-4 and 5-9 as two tasks: nothing to install), R@K over every caption after every
task and over the union of the seen tasks (CTP's report), with the continual pre-training methods."""
import pytest

from orchestrator.cli import main
from streams.builtin import DIGIT_NAMES, DIGIT_TEMPLATES, digit_image
from streams.manifest import StreamSpec, write_manifest
from streams.recipes import retrieval_task
from streams.writer import Sample

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TASKS = {"digits-0-4": range(0, 5), "digits-5-9": range(5, 10)}
PAIRS_PER_TASK = 24  # 16 train, 8 eval
RECALL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "score"}
# What each method adds to the contrastive loss once there is a previous task to keep.
KEEP_TERMS = {"ctp": ["topology_cross", "topology_intra"], "inc_clip": ["distill"],
              "mulki": ["distill_initial", "distill_previous"]}


@pytest.fixture(scope="module")
def digit_captions(tmp_path_factory):
    """Two retrieval tasks of real digit images, each with its five captions (the .txt: one of them)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit-captions")
    digits = load_digits()
    tasks = []
    for name, labels in TASKS.items():
        chosen = [i for i in range(len(digits.target)) if digits.target[i] in labels][:PAIRS_PER_TASK]
        pairs = []
        for i in chosen:
            captions = [template.format(DIGIT_NAMES[digits.target[i]]) for template in DIGIT_TEMPLATES]
            pairs.append(Sample(key=f"digit{i:04d}", image=digit_image(digits.images[i]), caption=captions[i % 5],
                                extra={"captions": captions, "image_id": f"digit{i:04d}"}))
        cut = len(pairs) * 2 // 3
        tasks.append(retrieval_task(root, name, pairs[:cut], pairs[cut:]))
    return write_manifest(StreamSpec(name="digit-captions", tasks=tasks), root / "manifest.yaml")


@pytest.mark.parametrize("method", sorted(KEEP_TERMS))
def test_retrieval_stream_runs_through_vlcl_run(method, ray_session, digit_captions, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"stream={digit_captions}", f"method.name={method}", "model.name=vlcl-tiny",
                 f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.checkpoints=none",
                 "train.batch_size=8", "train.max_steps_per_task=4", "train.lr=1e-3",
                 "train.cpus_per_worker=0.5", "train.shuffle_buffer=16",
                 # one method on two workers: each scores its share of the pairs, R@K over all of them
                 f"train.num_workers={2 if method == 'mulki' else 1}"]
    code = main(["run", *(arg for override in overrides for arg in ("--set", override))])
    assert code == 0, capsys.readouterr().err

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("digit-captions").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vlcl.method"] == method
    for task in TASKS:
        logged = {key.split("/")[-1] for key in run.data.metrics if key.startswith(f"eval/{task}/")}
        assert logged == RECALL_KEYS
        # scored before training (step 0) and after each of the two tasks
        history = client.get_metric_history(run.info.run_id, f"eval/{task}/r_mean")
        assert sorted(m.step for m in history) == [0, 1, 2] and all(0 <= m.value <= 1 for m in history)
    assert "cl/bwt" in run.data.metrics and "cl/transfer" in run.data.metrics
    # CTP's report: one gallery of both tasks' eval sets (16 images, 80 captions), once two are seen
    union = client.get_metric_history(run.info.run_id, "seen_union/r_mean")
    assert [m.step for m in union] == [2] and 0 <= union[0].value <= 1
    assert {key for key in run.data.metrics if key.startswith("seen_union/")} == {f"seen_union/{k}" for k in RECALL_KEYS}

    # The keep-terms are logged for the second task and are live there (a term that stays 0 would
    # mean the method never saw its teacher or memory).
    steps_per_task = 4
    for term in KEEP_TERMS[method]:
        history = client.get_metric_history(run.info.run_id, f"train/{term}")
        second_task = [m.value for m in history if m.step > steps_per_task]
        assert second_task and any(value > 0 for value in second_task), (term, history)
