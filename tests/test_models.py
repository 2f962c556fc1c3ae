"""cure_hf.models: timm names, local folders, transformers models, in-model normalisation, CIFAR networks."""

import pytest
import timm
import torch
import torch.nn as nn

import cure_hf  # noqa: F401  (registers the CIFAR networks)
from cure_hf.hub import save_pretrained
from cure_hf.models import PixelNormalized, create_model, find_head_modules, load_model


# ----------------------------------------------------------------------------------- CIFAR networks
@pytest.mark.parametrize(
    "name, params, feature_map",
    [
        ("cifar_resnet18", 11_173_962, 4),
        ("cifar_preact_resnet18", 11_172_170, 4),
    ],
)
def test_cifar_resnets_are_registered_in_timm(name, params, feature_map):
    model = timm.create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)  # 3x3 stride-1 stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # and no max-pool
    with torch.no_grad():
        features = model.forward_features(torch.rand(2, 3, 32, 32))
        assert features.shape == (2, 512, feature_map, feature_map)  # 32 / 8: three stride-2 stages only
        assert model.forward_head(features).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert find_head_modules(model) == ["head.fc"]


def test_preact_resnet_normalises_at_the_end_not_at_the_stem():
    plain, preact = timm.create_model("cifar_resnet18"), timm.create_model("cifar_preact_resnet18")
    assert isinstance(plain.bn1, nn.BatchNorm2d) and isinstance(plain.final_bn, nn.Identity)
    assert isinstance(preact.bn1, nn.Identity) and isinstance(preact.final_bn, nn.BatchNorm2d)


def test_wide_resnet34_10_matches_the_trades_network():
    model = timm.create_model("cifar_wide_resnet34_10", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 46_160_474
    assert [len(b) for b in (model.block1, model.block2, model.block3)] == [5, 5, 5]
    assert model.num_features == 640
    with pytest.raises(ValueError, match="depth=33"):
        cure_hf.cifar_models.CifarWideResNet(depth=33)


def test_cifar_network_resets_its_head():
    model = timm.create_model("cifar_preact_resnet18", num_classes=10)
    model.reset_classifier(100)
    assert model.get_classifier().out_features == 100 and model.num_classes == 100
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)


# ------------------------------------------------------------------------------------- load_model
def test_timm_name_builds_untrained_with_its_normalisation_inside():
    model = load_model("cifar_resnet18", num_classes=7)
    assert isinstance(model, PixelNormalized)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    assert model.model.get_classifier().out_features == 7
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    expected = model.model((x - model.mean) / model.std)
    assert torch.equal(model(x), expected)


def test_vit_adapts_to_small_images_and_patches():
    model = load_model("test_vit", num_classes=10, image_size=16, patch_size=4)
    vit = model.model
    assert vit.patch_embed.proj.kernel_size == (4, 4)
    assert vit.pos_embed.shape[1] == (16 // 4) ** 2 + vit.num_prefix_tokens
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    assert model.input_size == (16, 16)


def test_pretrained_vit_folder_is_resampled_to_a_new_size_and_head(tmp_path):
    source = create_model("test_vit", 10, image_size=32, patch_size=8)
    save_pretrained(source, tmp_path / "vit", image_size=32)
    adapted = load_model(str(tmp_path / "vit"), num_classes=3, image_size=16, patch_size=4)
    vit = adapted.model
    assert vit.patch_embed.proj.kernel_size == (4, 4) and vit.pos_embed.shape[1] == 16 + vit.num_prefix_tokens
    assert vit.get_classifier().out_features == 3
    # the blocks come from the checkpoint, the new head does not
    src = source.model.state_dict()
    assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    assert adapted(torch.rand(1, 3, 16, 16)).shape == (1, 3)


def test_timm_folder_through_transformers_is_a_timm_wrapper(tmp_path):
    from transformers import TimmWrapperForImageClassification

    source = create_model("test_resnet", 10).eval()
    save_pretrained(source, tmp_path / "m", image_size=32)
    wrapped = load_model(str(tmp_path / "m"), library="transformers").eval()
    assert isinstance(wrapped.model, TimmWrapperForImageClassification)
    assert wrapped.input_size == (32, 32)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(wrapped(x).logits, source(x), rtol=0, atol=0)
    assert find_head_modules(wrapped) == ["model.timm_model.fc"]


def _tiny_vit_folder(path, mean, std):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(image_mean=mean, image_std=std, size={"height": 16, "width": 16}).save_pretrained(path)


def test_transformers_model_gets_the_processor_normalisation_and_a_new_head(tmp_path):
    from transformers import AutoModelForImageClassification

    _tiny_vit_folder(tmp_path / "hf", mean=[0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7])
    model = load_model(str(tmp_path / "hf"), num_classes=6).eval()
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.2, 0.3, 0.4]))
    assert torch.allclose(model.std.flatten(), torch.tensor([0.5, 0.6, 0.7]))
    assert model.model.classifier.out_features == 6
    assert find_head_modules(model) == ["model.classifier"]
    # saved again, transformers reads it back with the same logits (normalisation from the processor config)
    save_pretrained(model, tmp_path / "out")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(again((x - model.mean) / model.std).logits, model(x).logits)
    assert load_model(str(tmp_path / "out")).mean.flatten().tolist() == pytest.approx([0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="library='timm'.*transformers checkpoint"):
        load_model(str(tmp_path / "out"), library="timm")


def test_pickled_folder_is_refused_with_the_fix(tmp_path):
    model = create_model("test_resnet", 10)
    save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights \(found \['pytorch_model.bin'\]\).*save_file"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_model(f"local-dir:{tmp_path / 'm'}", library="transformers")


@pytest.mark.parametrize(
    "spec, kwargs, error, message",
    [
        ("not_a_model_xyz", {}, ValueError, "neither a timm model name"),
        ("resnet18", {"library": "keras"}, ValueError, "library='keras'"),
        ("test_resnet", {"library": "transformers"}, ValueError, "needs a folder or a Hub repo id"),
    ],
)
def test_bad_specs_name_the_problem(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_model(spec, 10, **kwargs)


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_model_data_config_is_timms_with_the_trained_size_and_the_in_model_normalisation():
    from cure_hf.models import model_data_config

    vit = create_model("test_vit", 3, image_size=(48, 32), patch_size=8, mean=(0.2, 0.3, 0.4), std=(0.4, 0.3, 0.2))
    assert vit.model.pos_embed.shape[1] == (48 // 8) * (32 // 8) + vit.model.num_prefix_tokens  # built non-square
    config = model_data_config(vit)
    pretrained = timm.create_model("test_vit").pretrained_cfg  # timm's own preprocessing of the architecture
    assert config == {
        "input_size": (3, 48, 32),
        "interpolation": pretrained["interpolation"],
        "crop_pct": 1.0,
        "crop_mode": pretrained["crop_mode"],
        "mean": (0.2, 0.3, 0.4),
        "std": (0.4, 0.3, 0.2),
    }
    untouched = create_model("test_resnet", 3)  # no new size: timm's pretrained config as it is
    expected = {
        k: pretrained_value
        for k, pretrained_value in timm.create_model("test_resnet").pretrained_cfg.items()
        if k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    }
    assert model_data_config(untouched) == expected
    with pytest.raises(ValueError, match=r"image_size=\(48, 0\)"):
        create_model("test_resnet", 3, image_size=(48, 0))
