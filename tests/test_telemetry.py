"""Per-layer telemetry of CURE's mask: values in [0, 1], consistent sums, logged by the Trainer, plotted."""

import os

import pytest
import torch
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.layerwise import parameter_blocks
from cure_hf.prominence import mask_gradients_
from cure_hf.telemetry import LayerTelemetry, plot_layer_telemetry, telemetry_series


def _blocks_of_logs(logs, quantity):
    prefix = f"telemetry/{quantity}/"
    return {k[len(prefix) :]: v for k, v in logs.items() if k.startswith(prefix)}


def test_telemetry_matches_the_masks_and_sums_consistently():
    model = make_tiny_model("test_resnet")
    generator = torch.Generator().manual_seed(0)
    params = [p for n, p in model.named_parameters() if "fc" not in n]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    blocks = parameter_blocks(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    l1_before = {id(p): p.grad.abs().sum() for p in params}

    telemetry = LayerTelemetry()
    conserved = {}
    telemetry.begin(model, params)

    def record(param, mask):
        conserved[id(param)] = mask.clone()
        telemetry.observe(param, mask)

    mask_gradients_(params, 0.3, on_mask=record)
    telemetry.end()
    logs = telemetry.flush()

    updated, share = _blocks_of_logs(logs, "updated_fraction"), _blocks_of_logs(logs, "grad_share")
    kept = _blocks_of_logs(logs, "kept_grad_fraction")
    assert set(share) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    for values in (updated, share, kept):
        assert all(0.0 <= v <= 1.0 for k, v in values.items()), values
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)
    # Each block's fraction is exactly what its masks say; "all" is the entry-weighted mean of the blocks.
    for block in share:
        members = [p for p in params if blocks[name_of[id(p)]] == block]
        n = sum(p.numel() for p in members)
        n_updated = sum(p.numel() - int(conserved[id(p)].sum()) for p in members)
        assert updated[block] == pytest.approx(n_updated / n, abs=1e-5)
        l1 = sum(float(l1_before[id(p)]) for p in members)
        assert share[block] == pytest.approx(l1 / sum(float(v) for v in l1_before.values()), rel=1e-4)
    total = sum(p.numel() for p in params)
    overall = sum(p.numel() - int(conserved[id(p)].sum()) for p in params) / total
    assert updated["all"] == pytest.approx(overall, abs=1e-5)
    assert 0.69 < overall < 0.72  # p = 0.3 conserves about 30% of every tensor
    assert telemetry.flush() == {}  # flushed: nothing left


def test_trainer_logs_telemetry_and_plots_it(digits, tmp_path):
    args = CURETrainingArguments(
        output_dir=str(tmp_path),
        adv_method="cure",
        max_steps=2,
        per_device_train_batch_size=16,
        attack_steps=1,
        layer_telemetry=True,
        conservation="hard",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=digits["train"].select(range(32)))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["telemetry/updated_fraction/all"] <= 1.0
        assert sum(_blocks_of_logs(entry, "grad_share").values()) == pytest.approx(1.0, abs=1e-4)
    assert set(telemetry_series(trainer.state.log_history)) >= {"stem", "layer1", "layer4", "all"}
    path = plot_layer_telemetry(trainer.state.log_history, str(tmp_path / "telemetry.png"))
    assert os.path.getsize(path) > 1000
    with pytest.raises(ValueError, match="layer_telemetry=True"):
        plot_layer_telemetry([{"loss": 1.0, "step": 1}], str(tmp_path / "none.png"))
