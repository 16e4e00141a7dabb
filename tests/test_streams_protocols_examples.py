"""The protocol configs in examples/{mtil,modx,ctp}: valid run configs, the protocols' budgets, and
`vlcl streams build` commands in their headers that the CLI accepts."""
import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import RunConfig, load_run_config
from methods import METHODS
from streams.cli import add_streams_commands
from streams.mtil_classes import LEARNING_RATES, ORDERS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROTOCOL_CONFIGS = sorted(p for folder in ("mtil", "modx", "ctp") for p in (EXAMPLES / folder).glob("*.yaml"))
MTIL_METHODS = {"finetune", "lwf", "lwf_vr", "icarl", "wise_ft", "wc", "we", "zscl"}


def test_every_harness_method_has_an_mtil_config():
    assert {p.stem for p in (EXAMPLES / "mtil").glob("*.yaml")} >= MTIL_METHODS
    assert {p.stem for p in (EXAMPLES / "modx").glob("*.yaml")} >= {"modx", "finetune"}
    assert {p.stem for p in (EXAMPLES / "ctp").glob("*.yaml")} >= {"ctp", "ctp_er", "seqf"}


@pytest.mark.parametrize("path", PROTOCOL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_protocol_config_is_a_valid_run_config(path):
    data = yaml.safe_load(path.read_text())
    assert data["method"]["name"] in METHODS
    METHODS[data["method"]["name"]].validate_hparams(data["method"].get("hparams") or {})
    if "per_task" in RunConfig.model_fields:
        load_run_config(path)
    else:  # until the run loop has per-task settings (CONTRACTS.md §1), validate the rest
        RunConfig(**{k: v for k, v in data.items() if k != "per_task"})


@pytest.mark.parametrize("path", sorted((EXAMPLES / "mtil").glob("*.yaml")), ids=lambda p: p.name)
def test_mtil_configs_carry_the_harness_budget(path):
    data = yaml.safe_load(path.read_text())
    train = data["train"]
    assert (train["batch_size"], train["max_steps_per_task"], train["warmup_steps"], train["weight_decay"]) == \
        (64, 1001, 100, 0.0)
    assert (data["model"]["name"], data["model"]["pretrained"]) == ("ViT-B-16", "openai")
    assert data["method"]["hparams"]["label_smoothing"] == 0.2
    lrs = {task: data["per_task"].get(task, {}).get("train.lr", train["lr"]) for task in ORDERS["I"]}
    assert lrs == LEARNING_RATES
    assert ("reference" in data.get("data", {})) == (data["method"]["name"] == "zscl")


def build_commands(text):
    """The `vlcl streams build ...` commands in a config's header comments, continuation lines joined."""
    lines = [line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip().startswith("#")]
    joined = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    return [shlex.split(line.split("   #")[0], comments=False)[1:] for line in joined.splitlines()
            if line.startswith("vlcl streams build")]


@pytest.mark.parametrize("path", PROTOCOL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_build_commands_in_the_headers_parse(path):
    parser = argparse.ArgumentParser(prog="vlcl")
    add_streams_commands(parser.add_subparsers(dest="command", required=True))
    commands = build_commands(path.read_text())
    assert commands, f"{path} names no `vlcl streams build` command"
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.func.__name__.startswith("run_build_")
