"""`attack_warmup_epochs`: the training attack's eps and step grow linearly from 0 over the first epochs."""

import copy

import pytest
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.methods import AttackSettings, warmed_up_attack


@pytest.mark.parametrize("epoch, fraction", [(0.0, 0.0), (0.5, 0.25), (1.0, 0.5), (2.0, 1.0), (3.5, 1.0)])
def test_linear_ramp(epoch, fraction):
    settings = AttackSettings(eps=8 / 255, step_size=2 / 255, steps=10)
    ramped = warmed_up_attack(settings, epoch, warmup_epochs=2.0)
    assert ramped.eps == pytest.approx(8 / 255 * fraction) and ramped.step_size == pytest.approx(2 / 255 * fraction)
    assert ramped.steps == 10 and ramped.random_start == settings.random_start
    assert warmed_up_attack(settings, epoch, warmup_epochs=0.0) == settings


@pytest.mark.parametrize("method", ["trades", "fgsm_rs"])
def test_the_trainer_attacks_with_the_ramped_budget(tmp_path, method, one_thread):
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(16))
    train.set_transform(image_transform(16, train=False))
    args = CURETrainingArguments(
        output_dir=str(tmp_path),
        adv_method=method,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        attack_steps=2,
        epsilon="16/255",
        attack_step_size="4/255",
        attack_warmup_epochs=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train)
    seen = []
    craft = trainer.method.attack.craft

    def craft_spy(model, x, labels, settings, clean_logits=None, **kwargs):
        x_adv = craft(model, x, labels, settings, clean_logits=clean_logits, **kwargs)
        seen.append((trainer.state.epoch, settings, (x_adv - x).abs().max().item()))
        return x_adv

    method, spec = copy.copy(trainer.method), trainer.method.attack

    class SpyAttack:  # the method's attack spec, with its craft recorded
        def __getattr__(self, name):
            return getattr(spec, name)

        craft = staticmethod(craft_spy)

    method.attack = SpyAttack()
    trainer.method = method
    trainer.train()
    assert [round(epoch, 3) for epoch, _, _ in seen] == [0.0, 0.5, 1.0, 1.5]  # 2 steps per epoch
    for epoch, settings, distance in seen:
        fraction = min(1.0, epoch / 1.0)
        assert settings.eps == pytest.approx(16 / 255 * fraction)
        assert settings.step_size == pytest.approx(4 / 255 * fraction)
        assert distance <= 16 / 255 * fraction + 1e-6  # the examples stay in the ramped ball
    assert seen[-1][2] > 8 / 255  # at full budget the attack uses it


def test_refused_values(tmp_path):
    with pytest.raises(ValueError, match="attack_warmup_epochs=-1 is invalid"):
        CURETrainingArguments(output_dir=str(tmp_path), attack_warmup_epochs=-1, report_to="none")
    with pytest.raises(ValueError, match="attack_warmup_epochs=2 is invalid: allowed 0 with adv_method='clean'"):
        CURETrainingArguments(output_dir=str(tmp_path), adv_method="clean", attack_warmup_epochs=2, report_to="none")
