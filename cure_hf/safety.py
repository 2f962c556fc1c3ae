"""Never silently wrong: the checks that stop a run with a clear message instead of letting it go on wrong.

Pure functions and small classes; the trainer (`base_trainer.py`) only calls them.

- Input checks: pixels finite floats in [0, 1], labels integer class indices within the model's classes, attack
  budgets that are not a no-op and not an eps written in the wrong units (:func:`check_attack_budget`).
- Models checked up front: saveable by :func:`cure_hf.hub.save_pretrained`, logits found without guessing.
- The divergence guard: an optimizer pre-step hook that stops (or skips) a step whose gradient is not finite,
  with one host synchronisation per optimizer step; a step the fp16 GradScaler skips never reaches it.
- Checkpoints: the completeness rules, the staging folder a checkpoint is written into before its rename, and the
  comparison of a resume's arguments with the checkpoint's `training_args.json`.
- One writer per folder: :class:`OutputDirLock`, an OS-level lock (``filelock``) on ``output_dir``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shutil
import socket
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    "MAX_EPSILON",
    "NONFINITE_POLICIES",
    "NonFiniteTrainingError",
    "OutputDirInUseError",
    "check_attack_budget",
    "check_pixel_values",
    "check_class_labels",
    "check_evaluation_batch",
    "check_logits_finite",
    "check_model_saveable",
    "check_model_output",
    "check_weights_finite",
    "NonFiniteGuard",
    "OutputDirLock",
    "staging_folder",
    "stale_staging_folders",
    "publish_checkpoint",
    "missing_checkpoint_parts",
    "resumable_checkpoints",
    "check_resume_arguments",
]

logger = logging.getLogger(__name__)

# The largest L-inf radius accepted, in pixel units of [0, 1]: 64/255 (about 0.25), four times the 16/255 used on
# ImageNet and eight times CIFAR's 8/255. Far larger radii stop meaning "imperceptible": at 0.5 the ball around every
# image holds the uniform grey image, so no classifier can be robust. A value like 1 or 8 is almost always a
# radius written in intensity levels (8 for 8/255) instead of pixel units.
MAX_EPSILON = 64 / 255
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite gradient or weight (divergence); nothing after it is saved."""


class OutputDirInUseError(RuntimeError):
    """Another process holds the lock on this output_dir."""


# ---------------------------------------------------------------------------------------------- inputs
def check_attack_budget(
    *,
    eps: float,
    step_size: Optional[float] = None,
    steps: Optional[int] = None,
    restarts: Optional[int] = None,
    eps_name: str = "eps",
    norm: str = "Linf",
) -> None:
    """Refuse budgets that make an attack a no-op (steps < 1, restarts < 1, step 0 with eps > 0) or an eps in the
    wrong units (negative, or, for the L-inf threat model, above :data:`MAX_EPSILON`; an L2 radius grows with the
    image size, e.g. 0.5 on CIFAR-10, so it has no such bound)."""
    if not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
        raise ValueError(
            f"{eps_name}={eps!r} is invalid: allowed 0 <= {eps_name} <= {MAX_EPSILON:.4f} (64/255) in "
            "pixel units of [0, 1], e.g. 8/255"
        )
    if norm == "Linf" and eps > MAX_EPSILON:
        raise ValueError(
            f"{eps_name}={eps:g} is invalid: allowed at most 64/255 = {MAX_EPSILON:.4f} in pixel units of [0, 1] "
            f"(larger balls contain images of another class). Did you mean {eps:g}/255 = {eps / 255:.4f}? "
            f"Write it as {eps_name}={eps:g}/255."
        )
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(
            f"steps={steps!r} is invalid: allowed an integer >= 1; 0 steps make PGD and CW a no-op "
            "(robust accuracy would equal clean accuracy)"
        )
    if restarts is not None and (not isinstance(restarts, int) or restarts < 1):
        raise ValueError(
            f"restarts={restarts!r} is invalid: allowed an integer >= 1; 0 restarts make PGD and CW a "
            "no-op (robust accuracy would equal clean accuracy)"
        )
    if step_size is not None and eps > 0 and not step_size > 0:
        raise ValueError(
            f"step_size={step_size!r} is invalid with {eps_name}={eps:g}: allowed > 0 (e.g. eps / 4); a "
            "zero step makes PGD and CW a no-op"
        )


def check_pixel_values(pixels: torch.Tensor, where: str = "pixel_values") -> None:
    """Refuse pixels that are not floats, not finite, or outside [0, 1] (one min/max pass, one host copy)."""
    if not torch.is_tensor(pixels) or not pixels.is_floating_point():
        dtype = pixels.dtype if torch.is_tensor(pixels) else type(pixels).__name__
        raise ValueError(
            f"{where} must be floats in [0, 1], got {dtype} (e.g. uint8 0..255 pixels); convert with "
            "ToTensor() / x.float() / 255 in the transform"
        )
    if pixels.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(pixels.detach()))  # NaN anywhere makes both NaN
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(pixels)).sum())
        raise ValueError(
            f"{where} contain {bad} NaN or infinite values; fix the data or its transform (a division "
            "by a zero std, a corrupt image) before training or evaluating on it"
        )
    tolerance = 1e-4
    if low < -tolerance or high > 1.0 + tolerance:
        hint = (
            " They look like 0..255 intensities: divide by 255."
            if high > 2.0 and low >= 0
            else (
                " Attacks work in pixel space: remove Normalize() from the data transform and normalise inside the model "
                "(cure_hf.models.PixelNormalized / create_model does this)."
            )
        )
        raise ValueError(f"{where} range from {low:.3f} to {high:.3f}, outside [0, 1].{hint}")


def check_class_labels(labels: torch.Tensor, num_classes: Optional[int] = None, where: str = "labels") -> torch.Tensor:
    """Labels as int64 class indices: refuse non-integer values and (with ``num_classes``) classes the model lacks."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        if not bool(torch.equal(labels, labels.round())):
            bad = labels[labels != labels.round()][:3].tolist()
            raise ValueError(
                f"{where} must be class indices, got non-integer values such as {bad}; map them to "
                "integers 0..num_classes-1 (e.g. a datasets ClassLabel column)"
            )
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{where} must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    if num_classes is not None and labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            outside = torch.unique(labels[(labels < 0) | (labels >= num_classes)]).tolist()
            shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
            raise ValueError(
                f"{where} range from {low} to {high}, but the model has {num_classes} classes (0..{num_classes - 1}): "
                f"{shown} {'is' if len(outside) == 1 else 'are'} no class of the model; give the model a head with as "
                "many outputs as the dataset has classes (create_model(name, num_classes)), or map the labels to "
                "0..num_classes-1"
            )
    return labels


def check_logits_finite(logits: torch.Tensor, where: str = "the model") -> None:
    """Refuse NaN/inf logits: their argmax is class 0 and would count as a prediction."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
        raise NonFiniteTrainingError(
            f"{where} returns NaN or infinite logits for {bad} of {len(logits)} examples, so no accuracy can be "
            "computed (NaN logits would all be read as class 0). Its weights are probably NaN after a diverged "
            "training: load the last good checkpoint"
        )


def check_evaluation_batch(pixels: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int]) -> torch.Tensor:
    """What training refuses, evaluation refuses too: returns the labels as int64."""
    check_pixel_values(pixels, "evaluation pixel_values")
    return check_class_labels(labels, num_classes, "evaluation labels")


# ---------------------------------------------------------------------------------------------- models
_SAVEABLE = (
    "a timm model (cure_hf.create_model / timm.create_model, optionally inside cure_hf.PixelNormalized) or "
    "a transformers image-classification model (a PreTrainedModel)"
)


def check_model_saveable(model: nn.Module) -> None:
    """Refuse, before training, a model that `cure_hf.hub.save_pretrained` could not write at the first checkpoint."""
    from transformers import PreTrainedModel

    from .models import unwrap_normalized

    inner, _ = unwrap_normalized(model)
    if type(inner).__name__ in ("TimmWrapperForImageClassification", "TimmWrapperModel"):
        inner = inner.timm_model
    if (hasattr(inner, "pretrained_cfg") and hasattr(inner, "num_classes")) or isinstance(inner, PreTrainedModel):
        return
    raise TypeError(
        f"CURETrainer cannot save a {type(inner).__name__}: checkpoints and save_model write {_SAVEABLE}, which timm "
        "and transformers both load. Fix: build the network with cure_hf.create_model('resnet18', num_classes) (any "
        "timm name), register your architecture with timm's @register_model, or use a transformers "
        "*ForImageClassification model; wrap it in cure_hf.PixelNormalized(model, mean, std) for normalisation, and "
        "in cure_hf.models.SelectLogits(model, index=1) when its forward returns several outputs such as (features, "
        "logits) (not in a wrapper of your own: SelectLogits saves the network inside)"
    )


def _logits_candidates(output) -> Tuple[Optional[torch.Tensor], str]:
    """The logits tensor of a model output and how it was found, or (None, why not)."""
    if torch.is_tensor(output):
        return output, "the output tensor"
    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits, "output.logits"
    if isinstance(output, (tuple, list)):
        shapes = [tuple(o.shape) if torch.is_tensor(o) else type(o).__name__ for o in output]
        batch = output[0].shape[0] if output and torch.is_tensor(output[0]) and output[0].dim() else None
        two_d = [i for i, o in enumerate(output) if torch.is_tensor(o) and o.dim() == 2 and o.shape[0] == batch]
        if two_d == [0]:
            return output[0], "output[0]"
        return None, (
            f"a {type(output).__name__} of {len(output)} items with shapes {shapes}: more than one could "
            "be the logits (or the logits are not the first item)"
        )
    return None, f"an output of type {type(output).__name__} without .logits"


@torch.no_grad()
def check_model_output(model: nn.Module, pixels: torch.Tensor, num_classes: Optional[int] = None) -> int:
    """One eval-mode forward on ``pixels`` (a batch of one or a few examples): the logits must be unambiguous,
    of shape (batch, classes), and cover ``num_classes`` (the dataset's, when known). Mode and RNG are restored.
    Returns the model's number of outputs (classes), which training labels are then checked against."""
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[pixels.device] if pixels.device.type == "cuda" else []):
            model.eval()
            output = model(pixels)
    finally:
        model.train(was_training)
    logits, how = _logits_candidates(output)
    if isinstance(output, (tuple, list)) and not hasattr(output, "logits"):
        # the last (batch, n) tensor is the usual place of the logits, e.g. (features, logits)
        batch = pixels.shape[0]
        two_d = [i for i, o in enumerate(output) if torch.is_tensor(o) and o.dim() == 2 and o.shape[0] == batch]
        index = two_d[-1] if two_d else 1
        fix = (
            f"Fix: wrap it in cure_hf.models.SelectLogits, which returns output[index] and is saved as the network "
            f"inside (cure_hf.load_model restores the wrapper): from cure_hf.models import SelectLogits; "
            f"model = SelectLogits(model, index={index})"
        )
    else:
        fix = (
            "Fix: forward(pixel_values) must return the logits, of shape (batch, num_classes), or an output with "
            ".logits: build the network with its classifier head, e.g. cure_hf.create_model(name, num_classes)"
        )
    if logits is None:
        raise ValueError(f"cannot tell which part of the model's output is the logits: it returns {how}. {fix}")
    if logits.dim() != 2 or logits.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"the model's logits ({how}) have shape {tuple(logits.shape)} for a batch of "
            f"{pixels.shape[0]}; expected (batch, num_classes). {fix}"
        )
    if num_classes is not None and logits.shape[1] < num_classes:
        raise ValueError(
            f"the model has {logits.shape[1]} outputs but the training set has {num_classes} classes; "
            f"build it with num_classes={num_classes} (e.g. cure_hf.create_model(name, {num_classes}))"
        )
    return int(logits.shape[1])


def _nonfinite_names(named: Iterable[Tuple[str, torch.Tensor]], limit: int = 3) -> Tuple[int, List[str]]:
    """How many of the tensors hold NaN/inf, and the first few names (one host copy)."""
    named = [(n, t) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not named:
        return 0, []
    flags = torch.stack([torch.isfinite(t).all().to("cpu", non_blocking=True) for _, t in named]).tolist()
    bad = [n for (n, _), ok in zip(named, flags) if not ok]
    return len(bad), bad[:limit]


def check_weights_finite(model: nn.Module, destination: str) -> None:
    """Refuse to save or push a model whose parameters or buffers hold NaN/inf (a diverged run)."""
    count, names = _nonfinite_names(list(model.named_parameters()) + list(model.named_buffers()))
    if count:
        raise NonFiniteTrainingError(
            f"refusing to save to {destination!r}: {count} weight tensors hold NaN or infinite values (e.g. "
            f"{', '.join(names)}); the training diverged. Load the last good checkpoint and lower learning_rate, or "
            "use bf16 instead of fp16"
        )


# --------------------------------------------------------------------------------------- divergence guard
class NonFiniteGuard:
    """An optimizer pre-step hook: a non-finite gradient stops training (``policy="stop"``) or drops the step
    (``policy="skip"``: every ``.grad`` is set to None, so the optimizer moves no parameter, momentum or decay).

    On the CPU, and with ``policy="skip"``, one host synchronisation per optimizer step (the total gradient norm).
    With ``deferred=True`` (``policy="stop"`` on a GPU) the step's verdict is copied to the host asynchronously and
    read at the next optimizer step (or at :meth:`flush`), so the step never waits for the device: a divergence
    then stops training one step later, before anything is saved (saving checks the weights too). The fp16
    GradScaler unscales and skips an overflowing step before the optimizer's own step runs, so its skipped steps
    never reach this hook. ``describe()`` returns the context of the error: the step, the learning rate, the precision.
    """

    def __init__(
        self,
        policy: str,
        module: Callable[[], nn.Module],
        describe: Callable[[], Dict[str, Any]],
        deferred: bool = False,
    ):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_policy={policy!r} is invalid: allowed {NONFINITE_POLICIES}")
        if deferred and policy != "stop":
            raise ValueError("a deferred divergence check can only stop training: skipping a step must know first")
        self.policy = policy
        self.module = module  # the unwrapped model, for the names of the offending tensors
        self.describe = describe
        self.deferred = deferred
        self.skipped_steps: List[int] = []
        self._hooked: Optional[torch.optim.Optimizer] = None
        self._pending: Optional[Tuple[torch.Tensor, Any]] = None  # (host flag, event) of the last unread step

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if self._hooked is inner:
            return
        inner.register_step_pre_hook(lambda opt, *_: self.check(opt))
        self._hooked = inner

    @torch.no_grad()
    def check(self, optimizer: torch.optim.Optimizer) -> None:
        if self.deferred:
            self.flush(previous_step=True)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        device = norms[0].device
        finite = torch.isfinite(torch.stack([n.float().to(device) for n in norms]).sum())
        if self.deferred and device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
            return
        if bool(finite):  # the one host synchronisation of the step
            return
        self._diverged(optimizer)

    def flush(self, previous_step: bool = False) -> None:
        """Read the verdict of the last step checked asynchronously; raise if its gradient was not finite."""
        if self._pending is None:
            return
        host, event = self._pending
        self._pending = None
        event.synchronize()  # that step's norm, long finished when called from the next step
        if not bool(host):
            self._diverged(None, late=previous_step)

    def _diverged(self, optimizer: Optional[torch.optim.Optimizer], late: bool = False) -> None:
        context, module = self.describe(), self.module()
        if late:  # found at the next optimizer step: name the step it happened in
            context = {**context, "step": context["step"] - 1}
        count, names = _nonfinite_names((n, p.grad) for n, p in module.named_parameters())
        where = f"{count} parameter tensors (e.g. {', '.join(names)})" if count else "the gradient"
        if self.policy == "skip":
            # A NaN forward may already have written NaN into BatchNorm statistics: then skipping cannot recover.
            weights, weight_names = _nonfinite_names(list(module.named_parameters()) + list(module.named_buffers()))
            if not weights:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                self.skipped_steps.append(context["step"])
                logger.warning(
                    "step %s: NaN or infinite gradient in %s; skipped this optimizer step "
                    "(nonfinite_policy='skip', %d skipped so far)",
                    context["step"],
                    where,
                    len(self.skipped_steps),
                )
                return
            where += (
                f", and the weights themselves are no longer finite ({', '.join(weight_names)}), so skipping "
                "cannot recover"
            )
        raise NonFiniteTrainingError(
            f"training diverged at step {context['step']}: NaN or infinite gradient in {where}. "
            + (
                "That step's update was applied in memory (the check reads the device a step late, so the step never "
                "waits for it), but nothing from it on is saved"
                if late
                else "Nothing from this step on is applied or saved"
            )
            + f"{context.get('last_checkpoint', '')}. Likely causes: a learning rate too high "
            f"(learning_rate={context.get('learning_rate')!r}, {context.get('current_lr')!r} at this step: try 10x "
            "lower), an fp16 overflow "
            f"({context.get('precision', 'fp32')}: prefer bf16=True), or bad data (NaN/inf pixels or labels, an "
            "empty batch). To drop such steps and continue instead, set nonfinite_policy='skip'."
        )


# ------------------------------------------------------------------------------------------ the lock
LOCK_NAME = ".cure_hf.lock"
LOCK_OWNER_NAME = ".cure_hf.lock.owner.json"


class OutputDirLock:
    """An exclusive, non-blocking, re-entrant lock on a folder: one writer (trainer) per output_dir.

    The lock is the OS's (``filelock``: ``flock`` on Unix, ``LockFileEx`` on Windows), so it is released when its
    process ends, even by SIGKILL: a lock left by a dead run never blocks. Who holds it (pid, host, user, since)
    is written next to it for the error message of the next contender.
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self._lock = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def holder(self) -> Dict[str, Any]:
        try:
            with open(os.path.join(self.folder, LOCK_OWNER_NAME), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        from filelock import FileLock, Timeout

        os.makedirs(self.folder, exist_ok=True)
        lock = FileLock(os.path.join(self.folder, LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = self.holder()
            who = (
                (
                    f"pid {owner.get('pid')} on host {owner.get('host')!r} (user {owner.get('user')!r}, since "
                    f"{owner.get('since')})"
                )
                if owner
                else "another process"
            )
            raise OutputDirInUseError(
                f"output_dir={self.folder!r} is in use by {who}: two trainers writing one folder interleave their "
                "checkpoints and the last writer's model wins. Fix: give this run its own output_dir, or wait for "
                f"the other run to end. (The lock, {os.path.join(self.folder, LOCK_NAME)}, is held by the OS and "
                "released when that process ends, even if it is killed.)"
            ) from None
        self._lock, self._depth = lock, 1
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": _user(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(os.path.join(self.folder, LOCK_OWNER_NAME), "w", encoding="utf-8") as f:
            json.dump(owner, f)

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        # Both files go before the lock itself, so the folder is left as the run wrote it. A contender that opens the
        # lock file in between finds it still locked; one that creates it anew gets it only as this process lets go.
        for name in (LOCK_OWNER_NAME, LOCK_NAME):
            with contextlib.suppress(OSError):  # already gone: nothing to tidy
                os.remove(os.path.join(self.folder, name))
        lock, self._lock = self._lock, None
        lock.release()

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "?"


# ------------------------------------------------------------------------------------------ checkpoints
STAGING_PREFIX = ".tmp-"
OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME = "optimizer.pt", "scheduler.pt", "trainer_state.json"
TRAINING_ARGS_JSON = "training_args.json"


def staging_folder(checkpoint: str) -> str:
    """Where ``checkpoint`` (``run_dir/checkpoint-N``) is written before its rename: ``run_dir/.tmp-checkpoint-N``,
    a name `transformers.trainer_utils.get_last_checkpoint` and checkpoint rotation never match."""
    parent, name = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(parent, STAGING_PREFIX + name)


def stale_staging_folders(run_dir: str) -> List[str]:
    """Staging folders left by a process that died while saving (incomplete checkpoints, never resumed from)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(
        os.path.join(run_dir, n)
        for n in os.listdir(run_dir)
        if n.startswith(STAGING_PREFIX + "checkpoint-") and os.path.isdir(os.path.join(run_dir, n))
    )


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the files are synced
            os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: str, final: str) -> None:
    """Make the fully written ``staged`` folder appear as ``final`` in one rename (after flushing it to disk).

    An older folder of the same name (a previous run's) is moved aside first and removed afterwards. Every file gets
    the permissions the umask allows (``open()``'s), also those a library wrote ``0o600`` (safetensors does).
    """
    from .files import chmod_as_umask

    for root, _, files in os.walk(staged):
        for name in files:
            chmod_as_umask(os.path.join(root, name))
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = staging_folder(final) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _has_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model.safetensors")) or os.path.isfile(
        os.path.join(folder, "model.safetensors.index.json")
    )


def missing_checkpoint_parts(folder: str, *, required_files: Iterable[Any] = ()) -> List[str]:
    """What a checkpoint folder lacks to resume exactly: weights, trainer state, optimizer, scheduler, RNG state,
    and ``required_files``: names, or ``(name, from_epoch)`` pairs for a file that a checkpoint holds only from that
    epoch on (the revision model after the efficient variant's warm-up)."""
    if not os.path.isdir(folder):
        return ["the folder itself"]
    names = set(os.listdir(folder))
    missing = [] if _has_weights(folder) else ["model.safetensors"]
    from .files import read_json

    state = read_json(os.path.join(folder, TRAINER_STATE_NAME), None)
    if state is None:
        missing.append(TRAINER_STATE_NAME)
    missing += [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME) if name not in names]
    if not any(n == "rng_state.pth" or (n.startswith("rng_state_") and n.endswith(".pth")) for n in names):
        missing.append("rng_state.pth")
    epoch = float((state or {}).get("epoch") or 0.0)
    for entry in required_files:
        name, from_epoch = (entry, 0.0) if isinstance(entry, str) else entry
        if name not in names and epoch >= from_epoch - 1e-9:
            missing.append(name)
    return missing


def resumable_checkpoints(run_dir: str, **rules) -> Tuple[Optional[str], Dict[str, List[str]]]:
    """The newest complete ``checkpoint-N`` of ``run_dir`` and, newest first, the newer incomplete ones skipped
    on the way with what each lacks (rules: those of :func:`missing_checkpoint_parts`)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        head, _, step = name.partition("-")
        if head == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(step), os.path.join(run_dir, name)))
    skipped: Dict[str, List[str]] = {}
    for _, folder in sorted(found, reverse=True):
        missing = missing_checkpoint_parts(folder, **rules)
        if not missing:
            return folder, skipped
        skipped[folder] = missing
    return None, skipped


# The arguments a resume must keep: they define the method and its attack, so a checkpoint of one method resumed
# with another would silently train a mixture (cure -> trades drops the revision model).
# Restored from the checkpoint's optimizer.pt/scheduler.pt whatever the arguments say: a changed value is not used.
OPTIMIZER_ARGUMENTS = (
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "sgd_momentum",
    "warmup_steps",
    "warmup_ratio",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def check_resume_arguments(
    folder: str,
    current: Dict[str, Any],
    method_arguments: Iterable[str],
    resolve: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
) -> List[str]:
    """Compare a resume's arguments (``current``, as `TrainingArguments.to_dict()`) with the checkpoint's
    ``training_args.json``: raise on a changed ``method_arguments`` entry (the method's and its components' fields,
    `cure_hf.components.method_argument_names`), return warnings for changed optimizer arguments. ``resolve`` gives
    the saved arguments' defaults that depend on the method (the component switches) their values."""
    from .files import read_json

    saved = read_json(os.path.join(folder, TRAINING_ARGS_JSON), None)
    if saved is None:
        return [
            f"{folder} has no readable {TRAINING_ARGS_JSON}: cannot check that this resume uses the checkpoint's "
            "method and hyperparameters"
        ]
    if resolve is not None:
        saved = resolve(saved)
    changed = [
        f"{name}={current.get(name)!r} (checkpoint: {saved.get(name)!r})"
        for name in method_arguments
        if name in saved and name in current and not _same(saved[name], current[name])
    ]
    if changed:
        raise ValueError(
            f"resume_from_checkpoint={folder!r} was trained with other method settings than this run: "
            f"{'; '.join(changed)}. Resuming would silently train a mixture of the two. Fix: resume with the "
            "checkpoint's values, or start a new run from its weights (cure_hf.load_model(checkpoint) as the model, "
            "without resume_from_checkpoint)"
        )
    return [
        f"{name}={current.get(name)!r} differs from the checkpoint's {saved.get(name)!r}; the resumed optimizer "
        "and schedule are the checkpoint's (optimizer.pt, scheduler.pt), so the new value is not used"
        for name in OPTIMIZER_ARGUMENTS
        if name in saved and name in current and not _same(saved[name], current[name])
    ]
