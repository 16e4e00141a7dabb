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
    assert config.method.hparams == {"alpha": 0.5}
    assert flatten(config)["method.hparams.alpha"] == "0.5"
    assert with_overrides(config, {"train.lr": 3e-4}).train.lr == 3e-4


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
