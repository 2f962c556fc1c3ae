"""Adversarial logit pairing (Kannan, Kurakin and Goodfellow, 2018) as a cure_hf method, in one file.

Import it before building the arguments (``import logit_pairing``; then ``adv_method="alp"``), or install it as a
package whose entry point names it (group ``cure_hf.methods``) so that ``recipes/train_vit.py --adv_method alp``
finds it too; docs/extending.md. ``python logit_pairing.py OUTPUT_DIR`` trains it for two steps.
"""

import torch

from cure_hf import AdversarialMethod, AttackSpec, register_method
from cure_hf.methods import smoothed_cross_entropy

ALP_CITATION = (
    "@article{kannan2018adversarial,\n  title={Adversarial Logit Pairing},\n"
    "  author={Kannan, Harini and Kurakin, Alexey and Goodfellow, Ian},\n"
    "  journal={arXiv preprint arXiv:1803.06373},\n  year={2018}\n}"
)


@register_method
class AdversarialLogitPairing(AdversarialMethod):
    """Half clean, half adversarial cross-entropy, plus the squared distance between the two batches' logits."""

    name = "alp"
    title = "ALP"
    citation, paper_id = ALP_CITATION, "1803.06373"
    attack = AttackSpec(kind="pgd", objective="ce", start="uniform")  # PGD on the cross-entropy, as PGD-AT
    uses_clean_pass = True  # the loss reads z_nat
    options = {"pairing_weight": 0.5}  # lambda; set with --method_options pairing_weight=1.0

    def loss(self, inputs, hp):
        smoothing = hp["label_smoothing_factor"]
        ce_nat = smoothed_cross_entropy(inputs.z_nat, inputs.labels, smoothing)
        ce_adv = smoothed_cross_entropy(inputs.z_adv, inputs.labels, smoothing)
        pairing = (inputs.z_nat.float() - inputs.z_adv.float()).pow(2).sum(dim=1).mean()
        loss = 0.5 * ce_nat + 0.5 * ce_adv + hp["pairing_weight"] * pairing
        parts = {"ce_nat": ce_nat.detach(), "ce_adv": ce_adv.detach(), "logit_pairing": pairing.detach()}
        return loss, parts


if __name__ == "__main__":  # a two-step run on the embedded digits data, saved with its card
    import sys

    from cure_hf import CURETrainer, CURETrainingArguments, create_model
    from cure_hf.data import image_transform, load_digits_dataset

    data = load_digits_dataset()
    data["train"].set_transform(image_transform(32, train=True))
    torch.manual_seed(0)
    args = CURETrainingArguments(
        output_dir=sys.argv[1] if len(sys.argv) > 1 else "alp-digits",
        adv_method="alp",
        method_options="pairing_weight=1.0",
        max_steps=2,
        per_device_train_batch_size=16,
        attack_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = CURETrainer(create_model("test_resnet", 10), args, train_dataset=data["train"])
    trainer.train()
    trainer.save_model()
    print("saved", args.output_dir)
