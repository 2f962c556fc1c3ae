"""`cure-hf evaluate --protocol robustbench-imagenet | robustbench-cifar10`, offline, on tiny local data.

Oracles: RobustBench's own id list (its sha256 and first line, from its repository), the class index of a WordNet
id by sorted order (how RobustBench's and torchvision's image folders number classes), torchvision's
Resize(256) + CenterCrop(224) + ToTensor and the same by hand with PIL and numpy, the model's accuracy computed
here on those pixels, and AutoAttack's own constructor arguments seen by a pass-through spy.
"""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cure_hf.cli import main
from cure_hf.protocols import (
    CIFAR10_CLASSES,
    PROTOCOLS,
    ProtocolArguments,
    imagenet_class_names,
    load_imagenet_subset,
    load_protocol_data,
    read_subset_ids,
    robustbench_imagenet_ids_file,
)

# robustbench/helper_files/imagenet_test_image_ids.txt of github.com/RobustBench/robustbench
ROBUSTBENCH_IDS_SHA256 = "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"
ROBUSTBENCH_FIRST_IDS = [
    "n09468604/ILSVRC2012_val_00015253.JPEG",
    "n02823750/ILSVRC2012_val_00020685.JPEG",
    "n09472597/ILSVRC2012_val_00039611.JPEG",
]
STANDARD_ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]  # AutoAttack's standard L-inf version


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def autoattack_spy(monkeypatch):
    """Every AutoAttack built, with its arguments and the attacks it ran; it still runs (a subclass)."""
    import pyautoattack

    built = []

    class Spy(pyautoattack.AutoAttack):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            built.append({**kwargs, "standard_attacks": list(self.attacks_to_run), "ran": []})

        def run_standard_evaluation(self, x, y, **kwargs):
            built[-1]["ran"] += list(self.attacks_to_run)
            return super().run_standard_evaluation(x, y, **kwargs)

    monkeypatch.setattr(pyautoattack, "AutoAttack", Spy)
    return built


def _robustbench_percent(correct, total):
    """RobustBench's update_json: str(round(accuracy * 100, 2))."""
    return str(round(correct / total * 100, 2))


def _reference_pixels(path):
    """RobustBench's ImageNet pixels with torchvision: PIL RGB, Resize(256), CenterCrop(224), ToTensor."""
    from torchvision import transforms as T

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(rgb)


def _hand_pixels(path):
    """The same by hand: shorter side to 256 (longer side truncated), bilinear; centred 224 crop; / 255."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    w, h = rgb.size
    new_w, new_h = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    return torch.from_numpy(resized[top : top + 224, left : left + 224].transpose(2, 0, 1) / 255)


def _predict(model, pixels):
    with torch.no_grad():
        return model.eval()(torch.stack(pixels)).argmax(-1).tolist()


# ------------------------------------------------------------------------------------ the shipped list
def test_the_shipped_ids_are_robustbench_list_with_its_licence():
    path = robustbench_imagenet_ids_file()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == ROBUSTBENCH_IDS_SHA256
    ids = read_subset_ids(path)
    assert len(ids) == len(set(ids)) == 5000
    assert ids[:3] == ROBUSTBENCH_FIRST_IDS
    notice = open(os.path.join(os.path.dirname(path), "NOTICE"), encoding="utf-8").read()
    assert (
        "MIT License" in notice and "Copyright (c) 2020 Francesco Croce, Maksym Andriushchenko, Vikash Sehwag" in notice
    )
    assert "github.com/RobustBench/robustbench" in notice


def test_imagenet_classes_are_numbered_by_sorted_wordnet_id():
    names = imagenet_class_names()
    assert len(names) == len(set(names)) == 1000 and names == sorted(names)
    assert names[0] == "n01440764" and names[999] == "n15075141"  # tench, toilet tissue


@pytest.mark.parametrize(
    "line", ["ILSVRC2012_val_00000001.JPEG", "n99999999/ILSVRC2012_val_00000001.JPEG", "n01440764/a/b.JPEG"]
)
def test_an_ids_line_that_is_not_wnid_slash_file_is_refused_with_its_line(tmp_path, line):
    path = tmp_path / "ids.txt"
    path.write_text(f"n01440764/ILSVRC2012_val_00000293.JPEG\n\n{line}\n")
    with pytest.raises(ValueError, match=r"line 3: .*'<wnid>/<file name>'"):
        read_subset_ids(str(path))


def test_a_repeated_id_is_refused(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("n01440764/a.JPEG\nn01443537/b.JPEG\nn01440764/a.JPEG\n")
    with pytest.raises(ValueError, match="line 3: 'n01440764/a.JPEG' is listed twice"):
        read_subset_ids(str(path))


# ------------------------------------------------------------------------------------ ImageNet pixels
def test_imagenet_pixels_are_robustbench_resize_256_center_crop_224(tmp_path):
    """Landscape, portrait, grey and an EXIF-rotated JPEG: RobustBench's loader does not apply EXIF rotation."""
    rng = np.random.default_rng(0)
    (tmp_path / "n01440764").mkdir()
    files = {}
    wide = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    wide.save(tmp_path / "n01440764" / "ILSVRC2012_val_00000001.JPEG")
    files["n01440764/ILSVRC2012_val_00000001.JPEG"] = tmp_path / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    tall = Image.fromarray(rng.integers(0, 256, (389, 257, 3), dtype=np.uint8))
    tall.save(tmp_path / "ILSVRC2012_val_00000002.JPEG")  # flat layout
    files["n01443537/ILSVRC2012_val_00000002.JPEG"] = tmp_path / "ILSVRC2012_val_00000002.JPEG"
    Image.fromarray(rng.integers(0, 256, (260, 330), dtype=np.uint8), mode="L").save(
        tmp_path / "ILSVRC2012_val_00000003.JPEG"
    )
    files["n15075141/ILSVRC2012_val_00000003.JPEG"] = tmp_path / "ILSVRC2012_val_00000003.JPEG"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": a reader applying it would see a 300x420 image
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(
        tmp_path / "ILSVRC2012_val_00000004.JPEG", exif=exif
    )
    files["n01443537/ILSVRC2012_val_00000004.JPEG"] = tmp_path / "ILSVRC2012_val_00000004.JPEG"

    dataset = load_imagenet_subset(str(tmp_path), list(files))
    assert len(dataset) == 4
    for i, path in enumerate(files.values()):
        pixels = dataset[i]["pixel_values"]
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
        assert torch.equal(pixels, _reference_pixels(path))
        assert torch.allclose(pixels, _hand_pixels(path), atol=1e-7)
    # labels: the index of the wnid among the 1000 sorted ones
    assert [dataset[i]["labels"] for i in range(4)] == [0, 1, 999, 1]
    with Image.open(files["n01443537/ILSVRC2012_val_00000004.JPEG"]) as image:
        from PIL import ImageOps

        rotated = ImageOps.exif_transpose(image).convert("RGB")
    assert rotated.size == (300, 420)
    assert not torch.equal(dataset[3]["pixel_values"], _reference_pixels_of(rotated))


def _reference_pixels_of(image):
    from torchvision import transforms as T

    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(image)


# ------------------------------------------------------------------------------------ ImageNet end to end
@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory):
    """A tiny 1000-class ViT for 224x224 images (patch 32: 49 tokens), saved as cure_hf saves: (folder, model)."""
    from cure_hf.hub import save_pretrained
    from cure_hf.models import create_model

    torch.manual_seed(0)
    model = create_model("test_vit", 1000, image_size=224, patch_size=32).eval()
    folder = tmp_path_factory.mktemp("imagenet_model") / "model"
    save_pretrained(model, str(folder))
    return folder, model


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory, imagenet_model):
    """Four JPEGs named like ImageNet validation files (class folders and flat) and an ids file labelling three
    of them with the model's own prediction and the fourth with another class: clean accuracy 3/4 exactly when
    the pixels reach the model as RobustBench makes them. Returns (folder, ids file, labels)."""
    _, model = imagenet_model
    root = tmp_path_factory.mktemp("imagenet_val")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(4):
        path = root / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(rng.integers(0, 256, (280 + 20 * i, 350, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    predicted = _predict(model, [_reference_pixels(p) for p in paths])
    labels = [p if i < 3 else (p + 1) % 1000 for i, p in enumerate(predicted)]
    wnids = sorted(imagenet_class_names())
    ids = []
    for i, (path, label) in enumerate(zip(paths, labels)):
        if i % 2 == 0:  # half in their class folder, as the validation set is laid out for torchvision
            (root / wnids[label]).mkdir(exist_ok=True)
            path.rename(root / wnids[label] / path.name)
        ids.append(f"{wnids[label]}/{path.name}")
    ids_file = root.parent / f"{root.name}_ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    return root, ids_file, labels


def test_imagenet_protocol_reports_robustbench_fields_with_autoattack_standard_at_4_255(
    imagenet_model, imagenet_val, autoattack_spy, tmp_path
):
    import cure_hf

    folder, _ = imagenet_model
    val, ids_file, _ = imagenet_val
    out = tmp_path / "imagenet.json"
    code = main(
        [
            "evaluate",
            "--model_name_or_path",
            str(folder),
            "--protocol",
            "robustbench-imagenet",
            "--test_dir",
            str(val),
            "--subset_ids",
            str(ids_file),
            "--eval_epsilon",
            "0.0156862745",  # the protocol's own radius (as RobustBench's README writes it) and attacks: accepted
            "--eval_attacks",
            "clean,autoattack",
            "--output_file",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["clean_acc"] == _robustbench_percent(3, 4) == "75.0"
    assert record["dataset"] == "imagenet" and record["threat_model"] == "Linf" and record["eps"] == "4/255"
    assert float(record["autoattack_acc"]) <= 75.0
    after = record["autoattack"]["accuracy_after_each_attack"]
    assert list(after) == STANDARD_ATTACKS and after["square"] == record["autoattack_acc"]
    assert record["n_examples"] == 4 and record["seed"] == 0 and record["number_forward_passes"] == 1
    assert record["cure_hf_version"] == cure_hf.__version__ and record["model"] == str(folder)
    assert record["architecture"] == "test_vit" and record["preprocessing"] == "Res256Crop224"
    # four ids of the user's: not RobustBench's list, so not the protocol
    assert record["protocol_complete"] is False and "not RobustBench's list" in record["protocol_incomplete"]
    assert record["subset_ids"]["robustbench_list"] is False and record["subset_ids"]["n_ids"] == 4
    for field in ("link", "name", "authors", "venue", "reported", "additional_data"):  # the submitter's to fill
        assert field in record and record[field] is None
    assert autoattack_spy, "AutoAttack was never built"
    for built in autoattack_spy:
        assert built["eps"] == 4 / 255 and built["version"] == "standard" and built["norm"] == "Linf"
        assert built.get("attacks") is None and built["standard_attacks"] == STANDARD_ATTACKS
    ran = [attack for built in autoattack_spy for attack in built["ran"]]
    assert ran and ran[0] == "apgd-ce"  # the three correct images were attacked


def test_imagenet_smoke_run_on_robustbench_first_images_is_marked_incomplete(imagenet_model, tmp_path):
    """RobustBench's own list, its first 3 images (a flat folder), --eval_max_examples 3: not the protocol."""
    folder, model = imagenet_model
    rng = np.random.default_rng(2)
    for entry in ROBUSTBENCH_FIRST_IDS:
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(tmp_path / entry.split("/")[1])
    out = tmp_path / "smoke.json"
    argv = ["evaluate", "--model_name_or_path", str(folder), "--protocol", "robustbench-imagenet"]
    argv += ["--test_dir", str(tmp_path), "--eval_max_examples", "3", "--output_file", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    wnids = sorted(imagenet_class_names())
    labels = [wnids.index(entry.split("/")[0]) for entry in ROBUSTBENCH_FIRST_IDS]
    predicted = _predict(model, [_reference_pixels(tmp_path / e.split("/")[1]) for e in ROBUSTBENCH_FIRST_IDS])
    assert record["clean_acc"] == _robustbench_percent(sum(p == y for p, y in zip(predicted, labels)), 3)
    assert record["protocol_complete"] is False and record["n_examples"] == 3
    assert "--eval_max_examples 3: 3 of the protocol's 5000 images" in record["protocol_incomplete"]
    assert record["subset_ids"]["robustbench_list"] is True and record["subset_ids"]["n_ids"] == 5000


def test_all_5000_images_of_robustbench_list_make_the_protocol_complete(tmp_path):
    """The whole list found (empty files stand in: no image is opened before it is evaluated)."""
    for entry in read_subset_ids(robustbench_imagenet_ids_file()):
        (tmp_path / entry.split("/")[1]).touch()
    protocol = PROTOCOLS["robustbench-imagenet"]
    data_args = _data_args(test_dir=str(tmp_path))
    dataset, data, subset, incomplete = load_protocol_data(protocol, ProtocolArguments(protocol.name), data_args, None)
    assert len(dataset) == 5000 and incomplete is None and subset["robustbench_list"] is True
    _, _, _, incomplete = load_protocol_data(protocol, ProtocolArguments(protocol.name), data_args, 5000)
    assert incomplete is None


def _data_args(**kwargs):
    from cure_hf.parser import DatasetArguments

    return DatasetArguments(**kwargs)


def test_missing_images_are_refused_naming_how_many_and_one(imagenet_val, tmp_path, capsys):
    val, ids_file, _ = imagenet_val
    ids = ids_file.read_text().split()
    missing = "n01440764/ILSVRC2012_val_00049999.JPEG"
    partial = tmp_path / "ids.txt"
    partial.write_text("\n".join(ids[:2] + [missing] + ids[2:]))
    argv = ["evaluate", "--model_name_or_path", "unused", "--protocol", "robustbench-imagenet"]
    code = main(argv + ["--test_dir", str(val), "--subset_ids", str(partial)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"1 of the 5 images to evaluate are missing from test_dir={str(val)!r}, e.g. {missing}" in err
    # RobustBench's data_dir (with val/ inside) given instead of the folder itself: the fix is named
    (tmp_path / "data" / "val").mkdir(parents=True)
    code = main(argv + ["--test_dir", str(tmp_path / "data"), "--eval_max_examples", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "2 of the 2 images" in err and f"pass --test_dir {tmp_path / 'data' / 'val'}" in err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--eval_epsilon", "8/255"], "--eval_epsilon 8/255 contradicts"),
        (["--eval_epsilon", "0.0157"], "--eval_epsilon 0.0157 contradicts"),
        (["--eval_epsilon", "4/255,8/255"], "--eval_epsilon 4/255,8/255 contradicts"),
        (["--eval_attacks", "clean,pgd20"], "--eval_attacks clean,pgd20"),
        (["--autoattack_version", "plus"], "--autoattack_version plus"),
        (["--autoattack_version", "custom", "--autoattack_attacks", "apgd-ce"], "--autoattack_version custom"),
        (["--eval_restarts", "3"], "--eval_restarts 3"),
        (["--eval_pgd_steps", "50"], "--eval_pgd_steps 50"),
        (["--image_size", "32"], "--image_size 32"),
        (["--plot", "eps.png"], "--plot eps.png"),
        (["--eval_max_examples", "5001"], "--eval_max_examples 5001"),
        (["--dataset_name", "uoft-cs/cifar10"], "--dataset_name uoft-cs/cifar10"),
        (["--test_split", "train"], "--test_split train"),
    ],
)
def test_flags_that_contradict_the_imagenet_protocol_are_refused(flags, named, tmp_path, capsys):
    argv = ["evaluate", "--model_name_or_path", "unused", "--protocol", "robustbench-imagenet"]
    code = main(argv + ["--test_dir", str(tmp_path), "--output_file", str(tmp_path / "r.json")] + flags)
    err = capsys.readouterr().err
    assert code == 2 and f"{named}" in err and "contradicts --protocol robustbench-imagenet" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--protocol", "robustbench-imagenet"], "needs --test_dir"),
        (
            ["--protocol", "robustbench-cifar10", "--eval_epsilon", "4/255"],
            "contradicts --protocol robustbench-cifar10",
        ),
        (
            ["--protocol", "robustbench-cifar10", "--subset_ids", "ids.txt"],
            "only read by --protocol robustbench-imagenet",
        ),
        (["--subset_ids", "ids.txt"], "only read by --protocol robustbench-imagenet"),
    ],
)
def test_protocol_usage_errors(argv, message, capsys):
    assert main(["evaluate", "--model_name_or_path", "unused", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_protocol_is_an_argparse_error(capsys):
    assert main(["evaluate", "--model_name_or_path", "unused", "--protocol", "robustbench-mnist"]) == 2
    assert "robustbench-imagenet" in capsys.readouterr().err  # argparse lists the choices


# ------------------------------------------------------------------------------------ CIFAR-10
@pytest.fixture(scope="module")
def cifar_model(tmp_path_factory):
    from cure_hf.hub import save_pretrained
    from cure_hf.models import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", 10, image_size=32).eval()
    folder = tmp_path_factory.mktemp("cifar_model") / "model"
    save_pretrained(model, str(folder))
    return folder, model


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255)


def _write_cifar_like(folder, images, labels, names=CIFAR10_CLASSES):
    """A local dataset folder as the Hub's uoft-cs/cifar10 is: a test parquet file, columns img and label."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"img": ImageFeature(), "label": ClassLabel(names=list(names))})
    os.makedirs(folder, exist_ok=True)
    Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
        os.path.join(folder, "test-00000-of-00001.parquet")
    )


@pytest.fixture
def fresh_datasets_cache(tmp_path, monkeypatch):
    import datasets

    # datasets caches a local folder by its name, not its content: a fresh cache per test
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def test_cifar10_protocol_on_a_local_copy_at_8_255(cifar_model, tmp_path, autoattack_spy, fresh_datasets_cache):
    folder, model = cifar_model
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    predicted = _predict(model, [_to_tensor(im) for im in images])
    labels = [p if i < 3 else (p + 1) % 10 for i, p in enumerate(predicted)]  # 3 of the first 4 right
    data = tmp_path / "cifar_like"
    _write_cifar_like(data, images, labels)
    out = tmp_path / "cifar.json"
    argv = ["evaluate", "--model_name_or_path", str(folder), "--protocol", "robustbench-cifar10"]
    argv += ["--dataset_name", str(data), "--output_file", str(out)]

    assert main(argv) == 2, "8 images are not CIFAR-10's 10,000: a full protocol run is refused"
    assert main(argv + ["--eval_max_examples", "4"]) == 0
    record = json.loads(out.read_text())
    assert record["clean_acc"] == _robustbench_percent(3, 4)
    assert record["dataset"] == "cifar10" and record["eps"] == "8/255" and record["threat_model"] == "Linf"
    assert record["protocol_complete"] is False and record["n_examples"] == 4 and "subset_ids" not in record
    assert record["data"] == str(data) and record["preprocessing"] == "ToTensor"
    assert autoattack_spy and all(b["eps"] == 8 / 255 and b["version"] == "standard" for b in autoattack_spy)
    assert [a for b in autoattack_spy for a in b["ran"]][:1] == ["apgd-ce"]


def test_cifar10_pixels_are_to_tensor_and_other_images_or_classes_are_refused(tmp_path, fresh_datasets_cache):
    from cure_hf.protocols import load_cifar10_test

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    _write_cifar_like(tmp_path / "ok", images, [0, 5, 9])
    dataset = load_cifar10_test(_data_args(dataset_name=str(tmp_path / "ok")), max_examples=3)
    for i, image in enumerate(images):
        assert torch.equal(dataset[i]["pixel_values"], _to_tensor(image)) and dataset[i]["labels"] == [0, 5, 9][i]

    _write_cifar_like(tmp_path / "big", [im.resize((64, 64)) for im in images], [0, 5, 9])
    big = load_cifar10_test(_data_args(dataset_name=str(tmp_path / "big")), max_examples=3)
    with pytest.raises(ValueError, match="32x32 images as they are.* is 64x64"):
        big[0]
    _write_cifar_like(tmp_path / "svhn", images, [0, 5, 9], names=[str(i) for i in range(10)])
    with pytest.raises(ValueError, match="needs CIFAR-10's, in its order"):
        load_cifar10_test(_data_args(dataset_name=str(tmp_path / "svhn")), max_examples=3)


def test_cifar10_full_test_set_is_the_protocol(cifar_model, tmp_path, monkeypatch, fresh_datasets_cache):
    """10,000 images, 1,000 per class: protocol_complete true. AutoAttack is stubbed here to an attack that finds
    nothing (its real run is tested above); clean accuracy is still the model's on every image."""
    import pyautoattack

    folder, model = cifar_model
    rng = np.random.default_rng(5)
    distinct = rng.integers(0, 256, (97, 32, 32, 3), dtype=np.uint8)  # PNG-encoded once each, then repeated
    encoded = []
    for array in distinct:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    labels = [i % 10 for i in range(10000)]
    _write_cifar_like(tmp_path / "cifar10", [encoded[i % 97] for i in range(10000)], labels)

    def finds_nothing(self, x, y, batch_size=250, state_path=None):
        return x, y  # it is given only the images still classified correctly

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", finds_nothing)
    out = tmp_path / "full.json"
    argv = ["evaluate", "--model_name_or_path", str(folder), "--protocol", "robustbench-cifar10"]
    assert main(argv + ["--dataset_name", str(tmp_path / "cifar10"), "--output_file", str(out)]) == 0
    record = json.loads(out.read_text())
    with torch.no_grad():
        predicted = model(torch.from_numpy(distinct.transpose(0, 3, 1, 2).astype(np.float32) / 255)).argmax(-1)
    correct = sum(int(predicted[i % 97]) == labels[i] for i in range(10000))
    assert record["protocol_complete"] is True and "protocol_incomplete" not in record
    assert record["n_examples"] == 10000 and record["clean_acc"] == _robustbench_percent(correct, 10000)
    assert record["autoattack_acc"] == record["clean_acc"]
