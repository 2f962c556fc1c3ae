"""GPU checks of the mixed-precision and DDP paths that a CPU cannot run (fp16 autocast + GradScaler, cuDNN BatchNorm).

    PYTHONPATH=. python tests/scripts/dist_gpu_check.py [fp16_scaler_checks fp16_attack_check ...]

Needs one CUDA GPU; uses the embedded digits as a plain torch Dataset (no `datasets` package needed). Prints one
line per check and exits non-zero if any fails:
1. fp16 CURE (loss and paper prominence, hard conservation) trains with a GradScaler; a step whose gradient
   overflows is skipped by the scaler and runs neither the mask nor the revision.
2. The fp16 attack: pixels moved by one TRADES-KL step and sign agreement with fp32.
3. bf16 trains every method; evaluation runs in fp32.
4. DDP (2 processes, gloo, both on this GPU) with BatchNorm and several forward passes before one backward,
   with broadcast_buffers True and False.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAILURES = []


def check(name):
    def wrap(fn):
        try:
            print(f"PASS {name}: {fn()}", flush=True)
        except Exception:  # report and go on with the other checks
            FAILURES.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn

    return wrap


class Digits(torch.utils.data.Dataset):
    def __init__(self, n=64):
        from sklearn.datasets import load_digits

        d = load_digits()
        grey = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
        self.x = nn.functional.interpolate(grey, size=(32, 32), mode="bilinear").clamp(0, 1).repeat(1, 3, 1, 1)
        self.y = torch.tensor(d.target[:n], dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def trainer_for(method, steps=3, callbacks=(), **fields):
    from cure_hf import CURETrainer, CURETrainingArguments, create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", 10)
    args = CURETrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        max_steps=steps,
        attack_steps=3,
        learning_rate=0.05,
        eval_pgd_steps=2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        adv_method=method,
        **({"revision_rate": 1.0} if method == "cure" else {}),
        **fields,
    )
    trainer = CURETrainer(
        model=model, args=args, train_dataset=Digits(), eval_dataset=Digits(16), callbacks=list(callbacks)
    )
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return trainer, model, dtypes


def fp16_scaler_checks():
    from transformers import TrainerCallback

    class Overflow(TrainerCallback):
        """Counts skipped steps; `attach` makes step 0's gradient overflow inside backward, before the unscale."""

        def __init__(self):
            self.trainer, self.skipped = None, 0

        def attach(self, trainer, model):
            self.trainer = trainer
            overflow = lambda g: g * float("inf") if trainer.state.global_step == 0 else g  # noqa: E731
            next(model.parameters()).register_hook(overflow)

        def on_step_end(self, args, state, control, **kwargs):
            self.skipped += int(self.trainer.accelerator.optimizer_step_was_skipped)

    out = []
    for prominence in ("loss", "paper"):
        overflow = Overflow()
        trainer, model, dtypes = trainer_for(
            "cure", steps=6, callbacks=[overflow], fp16=True, prominence=prominence, conservation="hard"
        )
        overflow.attach(trainer, model)
        assert trainer.accelerator.scaler is not None and trainer.accelerator.scaler.is_enabled()
        before = [p.detach().clone() for p in model.parameters()]
        masks = []
        conserve = trainer._conserve_and_update

        def counted(conserve=conserve, masks=masks):  # returns None, as an optimizer pre-step hook must
            masks.append(1)
            conserve()

        trainer._conserve_and_update = counted
        trainer.train()
        assert set(dtypes) == {torch.float16}, set(dtypes)
        assert overflow.skipped >= 1, "the forced overflow was not skipped"
        taken = trainer.state.global_step - overflow.skipped
        assert trainer.revision.step == len(masks) == taken, (trainer.revision.step, len(masks), taken)
        assert trainer._paper_grads is None
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        assert not bad, (prominence, overflow.skipped, trainer.state.global_step, len(masks), bad[:5])
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        out.append(
            f"{prominence}: {overflow.skipped} of {trainer.state.global_step} steps skipped, masks and "
            f"revisions {len(masks)}, final scale {trainer.accelerator.scaler.get_scale():g}"
        )
    return "; ".join(out)


def fp16_attack_check():
    from cure_hf import create_model
    from cure_hf.attacks import attack_mode, kl_divergence, pgd

    torch.manual_seed(0)
    model = create_model("test_resnet", 10).cuda().eval()
    x = 0.1 + 0.8 * torch.rand(64, 3, 32, 32, device="cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(1)  # noqa: E731
    start = x + 0.001 * torch.randn(x.shape, generator=gen(), device="cuda")
    with torch.no_grad():
        clean = model(x)
    with attack_mode(model):
        probe = start.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(kl_divergence(model(probe), clean, reduction="sum"), probe)
    with torch.autocast("cuda", dtype=torch.float16):
        x_adv = pgd(
            model,
            x,
            None,
            eps=8 / 255,
            step_size=1 / 255,
            steps=1,
            loss="kl",
            init="normal",
            clean_logits=clean,
            generator=gen(),
        )
        with attack_mode(model):
            probe = start.clone().requires_grad_(True)
            (plain,) = torch.autograd.grad(kl_divergence(model(probe), clean, reduction="sum"), probe)
    moved = ((x_adv - start).abs() > 0.5 / 255).float().mean().item()
    agree = ((x_adv - start).sign() == exact.sign()).float().mean().item()
    plain_nonzero = (plain != 0).float().mean().item()
    assert moved > 0.99 and agree > 0.6, (moved, agree)
    return f"fp16 pixels moved {moved:.3f}, sign agreement with fp32 {agree:.3f} (unscaled fp16 gradient nonzero: {plain_nonzero:.3f})"


def bf16_every_method():
    out = []
    for method, extra in [
        ("clean", {}),
        ("pgd", {}),
        ("trades", {}),
        ("mart", {}),
        ("fgsm_rs", {}),
        ("cure", {}),
        ("cure", {"prominence": "paper", "conservation": "hard"}),
    ]:
        trainer, model, dtypes = trainer_for(method, steps=2, bf16=True, **extra)
        loss = trainer.train().training_loss
        assert set(dtypes) == {torch.bfloat16} and loss == loss, (method, set(dtypes), loss)
        out.append(f"{method}{'-paper' if extra else ''} {loss:.3f}")
    dtypes.clear()
    try:
        metrics = trainer.evaluate()
    except ModuleNotFoundError as missing:  # cure_hf's metrics need `evaluate`, not on every GPU image
        return ", ".join(out) + f"; evaluation not run ({missing})"
    assert set(dtypes) == {torch.float32}, set(dtypes)
    return ", ".join(out) + f"; eval in fp32: accuracy {metrics['eval_accuracy']:.3f}"


def compile_check():
    out = []
    for prominence in ("loss", "paper"):
        losses = {}
        for compiled in (False, True):
            trainer, model, dtypes = trainer_for(
                "cure", steps=3, bf16=True, prominence=prominence, torch_compile=compiled
            )
            losses[compiled] = trainer.train().training_loss
            names = [n for n, _ in trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters()]
        assert abs(losses[True] - losses[False]) < 0.05 * abs(losses[False]), losses
        out.append(f"{prominence}: loss eager {losses[False]:.4f}, compiled {losses[True]:.4f} ({names[0]})")
    return "; ".join(out)


def _ddp_worker(rank, broadcast, port, results):
    import torch.distributed as dist

    from cure_hf import create_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = create_model("test_resnet", 10).cuda()
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
        x = torch.rand(16, 3, 32, 32, device="cuda")
        for _ in range(2):  # TRADES/CURE pattern: clean and adversarial forward passes, then one backward
            loss = ddp(x).logsumexp(1).mean() + ddp(x.flip(0)).logsumexp(1).mean()
            loss.backward()
        results[rank] = "ok"
    except Exception as error:
        results[rank] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        dist.destroy_process_group()


def ddp_batchnorm_check():
    import torch.multiprocessing as mp

    outcomes = {}
    for i, broadcast in enumerate((False, True)):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_ddp_worker, args=(broadcast, 29611 + i, results), nprocs=2, join=True)
            outcomes[broadcast] = dict(results)
    assert set(outcomes[False].values()) == {"ok"}, outcomes  # the default CURETrainingArguments uses
    return "; ".join(f"broadcast_buffers={b}: {r}" for b, r in outcomes.items())


if __name__ == "__main__":
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    import accelerate
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
        f"{torch.cuda.get_device_name()}",
        flush=True,
    )
    chosen = set(sys.argv[1:])  # names of checks to run; all by default
    for name, fn in [
        ("fp16 GradScaler: skipped step runs no mask, no revision", fp16_scaler_checks),
        ("fp16 attack does not underflow", fp16_attack_check),
        ("bf16 every method, fp32 evaluation", bf16_every_method),
        ("DDP + BatchNorm + several forwards on cuDNN", ddp_batchnorm_check),
        ("torch_compile=True trains CURE like eager", compile_check),
    ]:
        if not chosen or fn.__name__ in chosen:
            check(name)(fn)
    sys.exit(1 if FAILURES else 0)
