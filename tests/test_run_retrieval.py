"""A retrieval stream end to end through `vlcl run`: real image-caption pairs (Tux Paint stamps, two
categories as two tasks), R@K evaluation after every task, with the continual pre-training methods."""
import pytest

from orchestrator.cli import main
from streams.manifest import StreamSpec, write_manifest
from streams.recipes import TUX_LONG_SIDE, retrieval_task, stamp_sample
from streams.sources import Sources, stamp_images, tux_stamps
from test_streams_recipes import offline_data

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CATEGORIES = ["animals", "food"]
PAIRS_PER_TASK = 24  # 16 train, 8 eval
RECALL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "score"}
# What each method adds to the contrastive loss once there is a previous task to keep.
KEEP_TERMS = {"ctp": ["topology_cross", "topology_intra"], "inc_clip": ["distill"],
              "mulki": ["distill_initial", "distill_previous"]}


@pytest.fixture(scope="module")
def tux_captions(tmp_path_factory):
    """Two retrieval tasks of real photos and their Tux Paint captions."""
    root = tmp_path_factory.mktemp("tux-captions")
    found = Sources()
    tasks = []
    for category in CATEGORIES:
        stamps, images = stamp_images(found, tux_stamps(found, [category])[:PAIRS_PER_TASK], TUX_LONG_SIDE)
        pairs = [stamp_sample(s, image) for s, image in zip(stamps, images)]
        cut = len(pairs) * 2 // 3
        tasks.append(retrieval_task(root, f"tux-{category}", pairs[:cut], pairs[cut:]))
    return write_manifest(StreamSpec(name="tux-captions", tasks=tasks), root / "manifest.yaml")


@offline_data("tuxpaint")
@pytest.mark.parametrize("method", sorted(KEEP_TERMS))
def test_retrieval_stream_runs_through_vlcl_run(method, ray_session, tux_captions, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"stream={tux_captions}", f"method.name={method}", "model.name=vlcl-tiny",
                 f"output_dir={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.checkpoints=none",
                 "train.batch_size=8", "train.max_steps_per_task=4", "train.lr=1e-3",
                 "train.cpus_per_worker=0.5", "train.shuffle_buffer=16",
                 # one method on two workers: each scores its share of the pairs, R@K over all of them
                 f"train.num_workers={2 if method == 'mulki' else 1}"]
    code = main(["run", *(arg for override in overrides for arg in ("--set", override))])
    assert code == 0, capsys.readouterr().err

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tux-captions").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vlcl.method"] == method
    for task in ("tux-animals", "tux-food"):
        logged = {key.split("/")[-1] for key in run.data.metrics if key.startswith(f"eval/{task}/")}
        assert logged == RECALL_KEYS
        # scored before training (step 0) and after each of the two tasks
        history = client.get_metric_history(run.info.run_id, f"eval/{task}/r_mean")
        assert sorted(m.step for m in history) == [0, 1, 2] and all(0 <= m.value <= 1 for m in history)
    assert "cl/bwt" in run.data.metrics and "cl/transfer" in run.data.metrics

    # The keep-terms are logged for the second task and are live there (a term that stays 0 would
    # mean the method never saw its teacher or memory).
    steps_per_task = 4
    for term in KEEP_TERMS[method]:
        history = client.get_metric_history(run.info.run_id, f"train/{term}")
        second_task = [m.value for m in history if m.step > steps_per_task]
        assert second_task and any(value > 0 for value in second_task), (term, history)
