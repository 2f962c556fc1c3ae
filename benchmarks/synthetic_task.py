"""A synthetic image task whose robust accuracy can fail: few robust features, many more predictive non-robust ones.

Each class c has two signatures, both fixed by ``task_seed``:

- robust: channel 0 is a grid of ``blocks x blocks`` squares, each at 0.5 +/- ``robust_amplitude`` by the class's
  random sign code. The amplitude is far above eps, so no L-inf perturbation of size eps moves a square across 0.5.
  The code shown is the class's own with probability ``1 - robust_noise`` and a uniformly drawn class's otherwise,
  so these features alone predict the label with accuracy about ``1 - robust_noise * (1 - 1/C)``;
- non-robust: channels 1 and 2 carry a random +/- sign per pixel times ``nonrobust_amplitude``, a fraction of eps,
  always the true class's. Hundreds of such pixels predict the label perfectly, and a perturbation of size eps can
  write any other class's signature over them (eps > 2 x the amplitude).

Every pixel also gets Gaussian noise (``noise``). Natural training leans on the non-robust signature (it is the
more predictive one: it also decides the examples whose robust code is wrong), so PGD-20 at eps takes its accuracy
to about 0. Adversarial training at eps must use the robust squares: its PGD-20 accuracy is well above chance and
below 100% (bounded by the robust code's own accuracy). ``tests/test_benchmarks.py`` trains both on the CPU;
``benchmarks/bench_targets.py`` compares fp32 and the speed preset on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["RobustTask"]


@dataclass(frozen=True)
class RobustTask:
    """The task's parameters (see the module docstring); ``eps`` is the attack budget the amplitudes refer to."""

    image_size: int = 16
    num_classes: int = 10
    blocks: int = 4
    eps: float = 8 / 255
    robust_amplitude: float = 0.15
    robust_noise: float = 0.25
    nonrobust_amplitude_over_eps: float = 0.4
    noise: float = 0.02
    task_seed: int = 0

    @property
    def robust_ceiling(self) -> float:
        """The accuracy of the robust code itself: what a perfectly robust classifier can reach."""
        return 1.0 - self.robust_noise * (1.0 - 1.0 / self.num_classes)

    def signatures(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(robust codes (C, blocks, blocks), non-robust signs (C, 2, H, W)), each in {-1, +1}."""
        generator = torch.Generator().manual_seed(self.task_seed)
        size, classes = self.image_size, self.num_classes
        robust = torch.randint(0, 2, (classes, self.blocks, self.blocks), generator=generator).float() * 2 - 1
        nonrobust = torch.randint(0, 2, (classes, 2, size, size), generator=generator).float() * 2 - 1
        return robust, nonrobust

    def sample(self, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples: float images (N, H, W, 3) in [0, 1] (``TensorImageDataset``'s layout) and their labels."""
        if self.image_size % self.blocks:
            raise ValueError(f"image_size={self.image_size} must be a multiple of blocks={self.blocks}")
        generator = torch.Generator().manual_seed(seed)
        robust, nonrobust = self.signatures()
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        shown = torch.where(
            torch.rand(n, generator=generator) < self.robust_noise,
            torch.randint(0, self.num_classes, (n,), generator=generator),
            labels,
        )
        scale = self.image_size // self.blocks
        squares = robust[shown].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        pixels = torch.empty(n, 3, self.image_size, self.image_size)
        pixels[:, 0] = 0.5 + self.robust_amplitude * squares
        pixels[:, 1:] = 0.5 + self.nonrobust_amplitude_over_eps * self.eps * nonrobust[labels]
        pixels += self.noise * torch.randn(pixels.shape, generator=generator)
        return pixels.clamp_(0.0, 1.0).permute(0, 2, 3, 1).contiguous(), labels


def main(argv=None) -> None:
    """Describe the task: its parameters, the robust code's ceiling and one sample's label balance."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=RobustTask.image_size)
    parser.add_argument("--num-classes", type=int, default=RobustTask.num_classes)
    parser.add_argument("--samples", type=int, default=1000, help="examples drawn to show the label balance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn examples")
    args = parser.parse_args(argv)
    task = RobustTask(image_size=args.image_size, num_classes=args.num_classes)
    images, labels = task.sample(args.samples, seed=args.seed)
    print(task)
    print(f"robust ceiling (accuracy of the robust code): {task.robust_ceiling:.3f}")
    print(f"images {tuple(images.shape)} in [{images.min():.3f}, {images.max():.3f}]")
    print("examples per class:", torch.bincount(labels, minlength=task.num_classes).tolist())


if __name__ == "__main__":
    main()
