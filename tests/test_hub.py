"""Saved folders load in timm and transformers with the trained model's logits; the push uploads that folder;
the model card parses and carries the metrics. No network: Hub ids resolve offline from a local Hub cache,
through the real huggingface_hub / timm / transformers code; only the upload's network call is replaced.
"""
import concurrent.futures
import json
import os
import shutil
import types

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoImageProcessor, AutoModelForImageClassification

from conftest import make_tiny_model
from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform, load_digits_dataset
from cure_hf.hub import load_model, save_pretrained
from cure_hf.methods import CURE_CITATION
from cure_hf.modelcard import write_model_card

EXPORTED = {"model.safetensors", "config.json", "README.md"}


@pytest.fixture(scope="module")
def tiny_digits():
    ds = load_digits_dataset()
    train, test = ds["train"].select(range(16)), ds["test"].select(range(16))
    train.set_transform(image_transform(32, train=True))
    test.set_transform(image_transform(32, train=False))
    return train, test


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache, read offline by huggingface_hub (and so by timm and transformers)."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests must not reach the network"
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def publish_to_cache(cache, repo_id, folder, files):
    """What a download leaves on disk: the files of one commit in huggingface_hub's cache layout."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commits = sorted((repo_dir / "snapshots").iterdir()) if (repo_dir / "snapshots").exists() else []
    commit = f"{len(commits) + 1:040x}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(os.path.join(folder, name), snapshot / name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _args(output_dir, **overrides):
    kwargs = dict(output_dir=str(output_dir), adv_method="cure", max_steps=1, per_device_train_batch_size=8,
                  attack_steps=1, learning_rate=0.05, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, eval_strategy="no")
    kwargs.update(overrides)
    return CURETrainingArguments(**kwargs)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def _assert_loads_everywhere(reference, x, folder=None, repo_id=None):
    """timm (its data config), transformers (its image processor) and cure_hf give the reference logits."""
    expected = reference(x)
    timm_name = f"local-dir:{folder}" if folder else f"hf-hub:{repo_id}"
    tm = timm.create_model(timm_name, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=tm))
    torch.testing.assert_close(tm(torch.stack([transform(img) for img in x])), expected, rtol=1e-5, atol=1e-6)

    location = folder or repo_id
    hf = AutoModelForImageClassification.from_pretrained(location).eval()
    processor = AutoImageProcessor.from_pretrained(location)
    torch.testing.assert_close(hf(**processor(x)).logits, expected, rtol=1e-5, atol=1e-6)

    ours = load_model(str(location) if folder else f"hf-hub:{repo_id}").eval()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_trained_model_round_trips_into_timm_and_transformers(tmp_path, tiny_digits, hub_cache, arch):
    train, test = tiny_digits
    trainer = CURETrainer(make_tiny_model(arch), _args(tmp_path / "run"), train_dataset=train)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # it did train
    out = tmp_path / "run" / "final"
    trainer.save_model(str(out))
    written = set(os.listdir(out))
    assert EXPORTED <= written and not any(f.endswith((".bin", ".pt", ".pth")) for f in written)
    config = json.loads((out / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {}) and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["label_names"] == [str(i) for i in range(10)]

    model = trainer.model.eval()
    x = torch.stack([test[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        _assert_loads_everywhere(model, x, folder=out)
        publish_to_cache(hub_cache, f"me/{arch}-robust", out, EXPORTED)
        _assert_loads_everywhere(model, x, repo_id=f"me/{arch}-robust")


@pytest.fixture
def fake_upload(monkeypatch, hub_cache):
    """Replaces only the network calls of HfApi: an upload copies the allowed files into the local Hub cache."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
                      run_as_future=False, **kwargs):
        files = sorted(filter_repo_objects(
            [os.path.relpath(os.path.join(root, f), folder_path) for root, _, names in os.walk(folder_path)
             for f in names],
            allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
        ))
        uploads.append({"repo_id": repo_id, "folder": str(folder_path), "files": files, "path_in_repo": path_in_repo})
        if path_in_repo is None:
            publish_to_cache(hub_cache, repo_id, folder_path, files)
        result = types.SimpleNamespace(commit_url=f"https://hub.local/{repo_id}")
        if run_as_future:
            future = concurrent.futures.Future()
            future.set_result(result)
            return future
        return result

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_push_uploads_exactly_the_folder_that_loads(tmp_path, tiny_digits, fake_upload):
    train, test = tiny_digits
    args = _args(tmp_path / "run", max_steps=2, push_to_hub=True, hub_model_id="me/cure-tiny", save_strategy="steps",
                 save_steps=1, hub_strategy="checkpoint")
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train)
    trainer.train()
    # --push_to_hub: every checkpoint pushed its model folder (plus the resumable checkpoint, as asked)
    model_pushes = [u for u in fake_upload if u["path_in_repo"] is None]
    assert len(model_pushes) == 2 and all(set(u["files"]) == EXPORTED for u in model_pushes)
    assert any(u["path_in_repo"] == "last-checkpoint" and "revision.safetensors" in u["files"] for u in fake_upload)

    fake_upload.clear()
    trainer.push_to_hub()
    (push,) = fake_upload
    assert push["repo_id"] == "me/cure-tiny" and push["folder"] == str(tmp_path / "run")
    assert set(push["files"]) == EXPORTED  # no training_args, optimizer, RNG state or checkpoints
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.robustness["method"] == "cure" and "hf-hub:me/cure-tiny" in card.text

    model = trainer.model.eval()
    x = torch.stack([test[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        _assert_loads_everywhere(model, x, repo_id="me/cure-tiny")


def test_model_card_parses_and_carries_the_metrics(tmp_path, tiny_digits):
    train, test = tiny_digits
    args = _args(tmp_path / "run", eval_attacks="clean,pgd", eval_pgd_steps=2, eval_max_examples=16,
                 per_device_eval_batch_size=16)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train, eval_dataset=test)
    trainer.card_overrides = {"dataset": "digits", "dataset_id": "sklearn/digits"}
    metrics = trainer.evaluate()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    results = {r.metric_config: r for r in card.data.eval_results}
    assert results["clean"].metric_value == round(100 * metrics["eval_accuracy"], 2)
    assert results["pgd2"].metric_value == round(100 * metrics["eval_pgd2_accuracy"], 2)
    assert results["pgd2"].metric_args == {"threat_model": "Linf", "eps": "8/255"}
    assert results["clean"].dataset_name == "digits" and card.data.datasets == ["sklearn/digits"]
    robust = card.data.robustness
    assert robust["architecture"] == "test_resnet" and robust["eps"] == "8/255" and robust["threat_model"] == "Linf"
    assert robust["clean_acc"] == results["clean"].metric_value and robust["additional_data"] is False
    assert robust["autoattack_acc"] is None  # not evaluated: no number invented
    assert {"adversarial-training", "method-cure"} <= set(card.data.tags)
    assert "| `conserve_fraction` | `0.3` |" in card.text and "| `revision_rate` |" in card.text
    assert CURE_CITATION in card.text


def test_write_model_card_with_autoattack(tmp_path):
    path = write_model_card(str(tmp_path), {
        "architecture": "cifar_resnet18", "method": "cure", "dataset": "CIFAR-10", "dataset_id": "uoft-cs/cifar10",
        "eps": 8 / 255, "clean_accuracy": 0.8676, "pgd20_accuracy": 0.5492, "autoattack_accuracy": 49.69,
        "base_model": "timm/resnet18.a1_in1k",
    })
    card = ModelCard.load(path)
    values = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert values == {"clean": 86.76, "pgd20": 54.92, "autoattack": 49.69}
    assert card.data.robustness["autoattack_acc"] == 49.69 and card.data.robustness["eps"] == "0.0313725"
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.base_model == "timm/resnet18.a1_in1k"


def test_hub_repo_with_only_pickled_weights_is_refused(tmp_path, hub_cache):
    model = make_tiny_model("test_resnet")
    folder = tmp_path / "pickled"
    save_pretrained(model, folder)
    torch.save(model.model.state_dict(), folder / "pytorch_model.bin")
    publish_to_cache(hub_cache, "someone/pickled", folder, ["config.json", "pytorch_model.bin"])
    with pytest.raises(ValueError, match=r"hf-hub:someone/pickled has no model.safetensors.*pytorch_model.bin"):
        load_model("hf-hub:someone/pickled")
