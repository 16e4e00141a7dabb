"""Run configs: defaults, overrides, and errors that name the field before any work starts."""
import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, flatten, load_run_config, with_overrides


def test_defaults_are_the_demo():
    config = load_run_config()
    assert (config.stream, config.method.name, config.model.name) == ("builtin:digits", "finetune", "vlcl-tiny")


def test_overrides_parse_yaml_scalars():
    config = load_run_config(None, ["train.lr=1e-4", "train.augment=true", "method.name=wise_ft",
                                    "method.hparams.alpha=0.5"])
    assert config.train.lr == 1e-4 and config.train.augment is True
    assert config.method.hparams.alpha == 0.5  # typed: the method's own Hparams model
    assert with_overrides(config, {"train.lr": 3e-4}).train.lr == 3e-4


def test_params_hold_every_resolved_method_field_defaults_included():
    from methods import get_method

    config = load_run_config(None, ["method.name=ctp"])
    params = flatten(config)
    fields = get_method("ctp").Hparams.model_fields
    assert len(fields) > 10
    for name, field in fields.items():
        assert params[f"method.{name}"] == str(field.default)
    assert params["method.name"] == "ctp" and not any(k.startswith("method.hparams") for k in params)


def test_per_task_settings_resolve_over_the_top_level_ones():
    config = load_run_config(None, ["method.name=wise_ft", "train.lr=1e-3", "train.warmup_steps=5",
                                    'per_task={"digits-2-3": {"train.lr": 5e-5, "method.hparams.alpha": 0.3},'
                                    ' "0": {"train.warmup_steps": 0}}'])
    first = config.task_settings("digits-0-1", "0")
    second = config.task_settings("digits-2-3", "1")
    other = config.task_settings("digits-4-5", "2")
    assert (first.lr, first.warmup_steps, first.hparams.alpha) == (1e-3, 0, 0.8)  # 0.8: the default
    assert (second.lr, second.warmup_steps, second.hparams.alpha) == (5e-5, 5, 0.3)
    assert (other.lr, other.warmup_steps) == (1e-3, 5)
    assert flatten(config)["per_task.digits-2-3.train.lr"] == "5e-05"


@pytest.mark.parametrize("override, where", [
    ('per_task={"0": {"train.batch_size": 8}}', "per_task.0.train.batch_size: not a per-task setting"),
    ('per_task={"0": {"train.lr": -1}}', "train.lr"),
    ('per_task={"0": {"method.hparams.nope": 1}}', "method.hparams.nope"),
    ("train.num_workers=3", "train.batch_size: 32 is not divisible by train.num_workers (3)"),
    ('task_order=["digits-0-1", "digits-0-1"]', "task_order"),
])
def test_cross_field_checks_fail_in_the_config_naming_the_field(override, where):
    with pytest.raises(ConfigError, match=where.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [override])


def test_per_task_keys_and_task_order_are_checked_against_the_stream(digits_manifest):
    from orchestrator.plan import build_plan

    base = [f"stream={digits_manifest}"]
    with pytest.raises(ConfigError, match=r"per_task.aircraft: not a task of stream 'digits'"):
        build_plan(load_run_config(None, [*base, 'per_task={"aircraft": {"train.lr": 1e-5}}']), 32)
    with pytest.raises(ConfigError, match=r"per_task.7: not a task"):
        build_plan(load_run_config(None, [*base, 'per_task={"7": {"train.lr": 1e-5}}']), 32)
    with pytest.raises(ConfigError, match=r"task_order: \['digits-9-9'\] are not tasks"):
        build_plan(load_run_config(None, [*base, 'task_order=["digits-9-9"]']), 32)
    reverse = ["digits-8-9", "digits-6-7", "digits-4-5", "digits-2-3", "digits-0-1"]
    plan = build_plan(load_run_config(None, [*base, f"task_order={reverse}", "train.max_steps_per_task=3",
                                             'per_task={"digits-0-1": {"train.max_steps_per_task": 2}}']), 32)
    assert plan.task_names == reverse and [t.index for t in plan.tasks] == [0, 1, 2, 3, 4]
    assert [t.steps for t in plan.tasks] == [3, 3, 3, 3, 2]
    assert all(t.train.cached and t.eval.cached for t in plan.tasks)  # small: decoded once on the workers
    streamed = build_plan(load_run_config(None, [*base, "data.cache=never"]), 32)
    assert len(streamed.streamed_tasks) == 5


def test_every_bad_field_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: -1\n  batch_sise: 8\nmodel:\n  precision: fp64\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.lr" in message and "train.batch_sise" in message and "model.precision" in message


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'zscll'.*finetune.*zscl"):
        load_run_config(None, ["method.name=zscll"])


def test_bad_hyperparameter_names_the_field():
    with pytest.raises(ConfigError, match="method.hparams.alpha"):
        load_run_config(None, ["method.name=wise_ft", "method.hparams.alpha=2"])


def test_methods_needing_reference_data_say_so():
    with pytest.raises(ConfigError, match="data.reference"):
        load_run_config(None, ["method.name=zscl"])


def test_missing_config_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(None, ["train.lr"])


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["run", "--set", "train.epochs_per_task=0"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs_per_task" in err and "Traceback" not in err


def test_cli_reports_a_missing_stream(capsys, tmp_path):
    assert main(["run", "--set", f"stream={tmp_path / 'nope.yaml'}", "--set", f"output_dir={tmp_path}"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unreachable_mlflow_server_fails_fast():
    from orchestrator.tracking import TrackingError, check_reachable

    with pytest.raises(TrackingError, match="http://127.0.0.1:9/ is unreachable"):
        check_reachable("http://127.0.0.1:9/", timeout_s=2)


def test_streaming_cpus_leave_the_read_tasks_a_share_of_the_spare_cpus():
    from orchestrator.run import streaming_cpus

    config = load_run_config(None, ["data.cache=never"])
    # A laptop: 2 CPUs, one training worker. The decoder must not take the last core from the readers.
    decoder, read = streaming_cpus(2.0, config)
    assert decoder + read == pytest.approx(1.0) and decoder == pytest.approx(0.75)
    # Room for Ray's defaults: one CPU per decoder and per read task.
    assert streaming_cpus(16.0, config) == (1.0, 1.0)
    # Two decoders on 2.5 spare CPUs share 1.875 of them; on 3, each gets its own.
    two = with_overrides(config, {"data.decoders": 2})
    assert streaming_cpus(3.5, two) == (pytest.approx(0.9375), pytest.approx(0.625))
    assert streaming_cpus(4.0, two) == (1.0, 1.0)
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker.*reserve 2"):
        streaming_cpus(2.0, with_overrides(config, {"train.num_workers": 2}))


def test_pretrain_options_are_one_validated_config_whose_errors_name_the_flag():
    from orchestrator.config import pretrain_config

    config = pretrain_config({"out": "x.pt", "steps": None, "lr": None})
    assert config.epochs == 5 and config.steps is None and config.lr == 1e-4 and config.batch_size == 128
    assert pretrain_config({"out": "x.pt", "steps": 3}).epochs is None
    with pytest.raises(ConfigError, match=r"--batch-size: Input should be greater than or equal to 1"):
        pretrain_config({"out": "x.pt", "batch_size": 0})
    with pytest.raises(ConfigError, match=r"exactly one of epochs and steps"):
        pretrain_config({"out": "x.pt", "epochs": 2, "steps": 3})
    with pytest.raises(ConfigError, match=r"--out: Field required"):
        pretrain_config({})


def test_a_run_that_loses_the_race_for_the_streams_dataset_row_logs_its_input_on_the_second_try(tmp_path,
                                                                                               digits_manifest):
    from mlflow.exceptions import MlflowException

    from orchestrator.tracking import Tracker
    from streams.manifest import load_stream

    stream = load_stream(digits_manifest)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(uri, "race", "trial", {})
    real, calls = tracker.client.log_inputs, []

    def lose_once(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:  # what a side-by-side trial's insert makes this one see
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(run_id, datasets=datasets)

    tracker.client.log_inputs = lose_once
    tracker.log_stream_input(stream, str(digits_manifest))
    assert len(calls) == 2
    assert tracker.client.get_run(tracker.run_id).inputs.dataset_inputs[0].dataset.name == stream.name
    tracker.client.log_inputs = lambda run_id, datasets: (_ for _ in ()).throw(MlflowException("store down"))
    with pytest.raises(MlflowException, match="store down"):
        tracker.log_stream_input(stream, str(digits_manifest))


def test_one_worker_on_a_laptop_trains_in_process_and_everything_else_on_ray(digits_manifest, monkeypatch):
    from orchestrator.plan import build_plan
    from orchestrator.run import resolve_launch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def launch(*overrides, trial=False):
        return resolve_launch(build_plan(load_run_config(None, [f"stream={digits_manifest}", *overrides]), 32),
                              trial=trial)

    assert launch() == "in_process"
    assert launch("train.num_workers=2") == "ray"  # data-parallel workers are Ray Train actors
    assert launch("data.cache=never") == "ray"  # streamed training splits come from Ray Data
    assert launch(trial=True) == "in_process"  # a one-worker trial trains in its own process
    assert launch("train.num_workers=2", trial=True) == "ray"
    assert launch("train.launch=ray") == "ray" and launch("train.launch=ray", trial=True) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a named cluster trains on its nodes
    assert launch() == "ray" and launch("train.launch=in_process") == "in_process"
    assert launch(trial=True) == "in_process"  # ... but a trial is already a process on one of them
    with pytest.raises(ConfigError, match=r"train.launch: in_process .* stream through Ray Data .*data.cache"):
        launch("train.launch=in_process", "data.cache=never")
    with pytest.raises(ConfigError, match=r"train.launch: in_process trains in this one process; "
                                          r"train.num_workers is 2"):
        load_run_config(None, ["train.launch=in_process", "train.num_workers=2"])
