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
import safetensors.torch
import timm
import torch
import transformers
from conftest import make_tiny_model
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform, load_digits_dataset
from cure_hf.hub import load_model, save_pretrained
from cure_hf.methods import CURE_CITATION, METHODS, PGD_AT_CITATION, TRADES_CITATION
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
    kwargs = dict(
        output_dir=str(output_dir),
        adv_method="cure",
        max_steps=1,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        eval_strategy="no",
    )
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

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        path_in_repo=None,
        allow_patterns=None,
        ignore_patterns=None,
        run_as_future=False,
        **kwargs,
    ):
        files = sorted(
            filter_repo_objects(
                [
                    os.path.relpath(os.path.join(root, f), folder_path)
                    for root, _, names in os.walk(folder_path)
                    for f in names
                ],
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        )
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
    args = _args(
        tmp_path / "run",
        max_steps=2,
        push_to_hub=True,
        hub_model_id="me/cure-tiny",
        save_strategy="steps",
        save_steps=1,
        hub_strategy="checkpoint",
    )
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
    args = _args(
        tmp_path / "run",
        eval_attacks="clean,pgd",
        eval_pgd_steps=2,
        eval_max_examples=16,
        per_device_eval_batch_size=16,
    )
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
    path = write_model_card(
        str(tmp_path),
        {
            "architecture": "cifar_resnet18",
            "method": "cure",
            "dataset": "CIFAR-10",
            "dataset_id": "uoft-cs/cifar10",
            "eps": 8 / 255,
            "clean_accuracy": 0.8676,
            "pgd20_accuracy": 0.5492,
            "autoattack_accuracy": 49.69,
            "base_model": "timm/resnet18.a1_in1k",
        },
    )
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


# ------------------------------------------------------------------------------------------- model card
HOSTILE = "x</a><script>alert(1)</script> | *bold*"


def _front_matter(card_path):
    import yaml

    text = open(card_path, encoding="utf-8").read()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text.split("---\n", 2)[2]


def test_card_escapes_user_text_and_keeps_its_yaml_valid(tmp_path):
    path = write_model_card(
        str(tmp_path),
        {
            "model_name": HOSTILE,
            "architecture": "test_resnet",
            "method": "trades",
            "dataset": HOSTILE,
            "dataset_id": HOSTILE,
            "hyperparameters": {"optim": HOSTILE, "epsilon": "8/255"},
            "clean_accuracy": 0.5,
            "weight_averaging": {"method": "ema", "note": HOSTILE},
        },
    )
    metadata, body = _front_matter(path)
    assert metadata["robustness"]["dataset"] == HOSTILE and metadata["model-index"][0]["name"] == HOSTILE
    assert "datasets" not in metadata  # not a Hub id: no datasets entry
    assert "<script>" not in body and "</a>" not in body
    escaped = r"x&lt;/a&gt;&lt;script&gt;alert(1)&lt;/script&gt; \| \*bold\*"
    assert body.count(escaped) >= 3  # title, dataset sentence, the hyperparameter table
    assert "| `epsilon` | `8/255` |" in body
    assert "Averaged weights" in body and "method=ema" in body


@pytest.mark.parametrize(
    "method, title, cited",
    [
        ("trades", "TRADES", TRADES_CITATION),
        ("pgd", "PGD-AT", PGD_AT_CITATION),
        ("cure", "CURE", CURE_CITATION),
    ],
    ids=["trades", "pgd", "cure"],
)
def test_card_cites_the_method_of_the_model_and_only_it(tmp_path, method, title, cited):
    card = ModelCard.load(write_model_card(str(tmp_path), {"method": method}))
    others = [m.citation for m in METHODS.values() if m.citation and m.citation != cited]
    assert f"trained with **{title}**" in card.text and cited in card.text
    assert not any(other in card.text for other in others)
    assert ("CURE" in card.text) == (method == "cure")  # cure_hf is named, CURE's paper is not, unless it trained
    assert "cure_hf" in card.text and "Averaged weights" not in card.text


def test_card_shows_the_loading_code_of_the_folders_format_and_the_versions(tmp_path):
    import cure_hf

    timm_card = ModelCard.load(write_model_card(str(tmp_path / "t"), {"library_name": "timm", "repo_id": "me/m"}))
    assert 'timm.create_model("hf-hub:me/m"' in timm_card.text
    assert 'AutoModelForImageClassification.from_pretrained("me/m")' in timm_card.text
    assert 'load_model("me/m")' in timm_card.text and timm_card.data.library_name == "timm"
    hf_card = ModelCard.load(write_model_card(str(tmp_path / "h"), {"library_name": "transformers", "repo_id": "me/m"}))
    assert "timm.create_model" not in hf_card.text and "timm" not in hf_card.data.tags
    assert (
        'AutoModelForImageClassification.from_pretrained("me/m")' in hf_card.text
        and 'load_model("me/m")' in hf_card.text
    )
    for name, version in (
        ("cure_hf", cure_hf.__version__),
        ("PyTorch", torch.__version__),
        ("transformers", transformers.__version__),
        ("timm", timm.__version__),
    ):
        assert f"- {name} {version}" in timm_card.text and f"- {name} {version}" in hf_card.text


def test_card_names_the_training_data_from_the_dataset_itself(tmp_path, monkeypatch):
    import datasets

    from cure_hf.data import DIGITS_DATASET_NAME, load_image_dataset

    data, _ = load_image_dataset("digits", max_train_samples=8)
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path / "digits"), train_dataset=data["train"])
    trainer.save_model()
    card = ModelCard.load(tmp_path / "digits" / "README.md")
    assert card.data.robustness["dataset"] == DIGITS_DATASET_NAME and card.data.datasets is None

    hub = datasets.DatasetDict(train=data["train"].with_format(None), test=data["test"].with_format(None))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config_name=None: hub)  # no network: a Hub id answers
    data, _ = load_image_dataset("me/digits-on-the-hub", max_train_samples=8)
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path / "hub"), train_dataset=data["train"])
    trainer.save_model()
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.datasets == ["me/digits-on-the-hub"] and card.data.robustness["dataset"] == "me/digits-on-the-hub"


def test_pretrained_timm_name_is_the_cards_base_model(tmp_path, hub_cache):
    source = timm.create_model("test_resnet", pretrained=False)  # its pretrained config: 1000 classes
    weights = tmp_path / "timm-weights"
    weights.mkdir()
    safetensors.torch.save_file(source.state_dict(), weights / "model.safetensors")
    publish_to_cache(hub_cache, "timm/test_resnet.r160_in1k", weights, ["model.safetensors"])
    model = load_model("test_resnet.r160_in1k", 10, pretrained=True)
    assert torch.equal(model.model.conv1[0].weight, source.conv1[0].weight)  # the Hub weights did load
    save_pretrained(model, tmp_path / "out")
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "timm/test_resnet.r160_in1k"
    save_pretrained(load_model("test_resnet", 10), tmp_path / "scratch")  # pretrained=False: no base model
    assert ModelCard.load(tmp_path / "scratch" / "README.md").data.base_model is None


# --------------------------------------------------------------------------- a save writes only its own files
def test_save_refuses_to_overwrite_the_users_readme_and_config(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    model = make_tiny_model("test_resnet")
    with pytest.raises(FileExistsError, match=r"\['README.md'\], which cure_hf did not write.*another folder"):
        save_pretrained(model, folder)
    (folder / "README.md").unlink()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    trainer = CURETrainer(model, _args(folder))
    with pytest.raises(FileExistsError, match=r"\['config.json'\], which cure_hf did not write"):
        trainer.save_model()
    # (the trainer's one-writer lock file, .cure_hf.lock, is the only thing added)
    assert [f for f in os.listdir(folder) if not f.startswith(".cure_hf.lock")] == ["config.json"]
    assert (folder / "config.json").read_text() == '{"model_type": "bert"}'
    (folder / "config.json").unlink()
    save_pretrained(model, folder)
    save_pretrained(model, folder)  # cure_hf's own earlier save is replaced
    assert set(os.listdir(folder)) == EXPORTED


def test_stale_shards_of_an_earlier_save_are_removed_and_not_pushed(tmp_path, fake_upload):
    from transformers import ViTConfig, ViTForImageClassification

    from cure_hf.hub import export_files, push_folder
    from cure_hf.models import PixelNormalized

    folder = tmp_path / "model"
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    vit = PixelNormalized(ViTForImageClassification(config), (0.5,) * 3, (0.5,) * 3, input_size=16)
    sharded = save_pretrained(vit, folder, max_shard_size="20KB")
    shards = [f for f in sharded if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in sharded

    model = make_tiny_model("test_resnet").eval()
    written = save_pretrained(model, folder, image_size=32)  # now a timm folder: one model.safetensors, no processor
    assert set(written) == EXPORTED and set(os.listdir(folder)) == EXPORTED
    assert export_files(str(folder)) == sorted(EXPORTED)
    push_folder(str(folder), "me/replaced")
    (push,) = fake_upload
    assert set(push["files"]) == EXPORTED
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _assert_loads_everywhere(model, x, repo_id="me/replaced")


def test_checkpoint_push_refuses_to_overwrite_the_users_readme(tmp_path, tiny_digits, fake_upload):
    train, _ = tiny_digits
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("# my notes\n")
    args = _args(
        run,
        max_steps=1,
        push_to_hub=True,
        hub_model_id="me/cure-tiny",
        save_strategy="steps",
        save_steps=1,
        hub_strategy="every_save",
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train)
    with pytest.raises(FileExistsError, match=r"\['README.md'\], which cure_hf did not write.*another folder"):
        trainer.train()
    assert (run / "README.md").read_text() == "# my notes\n"
    assert not (run / "config.json").exists() and not (run / "model.safetensors").exists()  # nothing half-copied
    assert [u for u in fake_upload if u["path_in_repo"] is None] == []  # and no model folder uploaded
    assert (run / "checkpoint-1" / "model.safetensors").is_file()  # the checkpoint itself is kept


def test_copy_export_replaces_only_an_earlier_cure_hf_export(tmp_path):
    from cure_hf.hub import copy_export

    checkpoint, target = tmp_path / "checkpoint", tmp_path / "target"
    save_pretrained(make_tiny_model("test_resnet"), checkpoint)
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileExistsError, match=r"\['config.json'\], which cure_hf did not write"):
        copy_export(str(checkpoint), str(target))
    assert os.listdir(target) == ["config.json"] and (target / "config.json").read_text() == '{"model_type": "bert"}'

    (target / "config.json").unlink()
    (target / "notes.txt").write_text("mine")  # not a model file: neither refused nor touched
    save_pretrained(make_tiny_model("test_resnet"), target)
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale")  # as if an earlier save were sharded
    config = json.loads((target / "config.json").read_text())
    config["cure_hf"]["files"].append("model-00001-of-00002.safetensors")
    (target / "config.json").write_text(json.dumps(config))
    assert copy_export(str(checkpoint), str(target)) == sorted(EXPORTED)
    assert set(os.listdir(target)) == EXPORTED | {"notes.txt"}
    for name in EXPORTED:
        assert (target / name).read_bytes() == (checkpoint / name).read_bytes()
