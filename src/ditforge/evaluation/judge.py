"""The judge of any labelled data: a small CNN classifier trained on a run's own training split.

"Did the model learn my classes?" is answered by the share of generated samples of class c that
this classifier reads as c, next to the share of real held-out images it reads correctly (the
ceiling). It is trained once per run and cached in `RUN/judge/` (weights in safetensors, what
it was trained on and how well it reads held-out images in JSON).

Why a CNN: measured on a 28x28 MNIST folder (2,400 training and 600 held-out digits, 2 CPU
cores; benchmarks/README.md "The judge"), held-out accuracy and training time were:
logistic regression on pixels 0.913 (1.4 s), an MLP on pixels 0.940 (4 s), an RBF SVC on pixels
0.957 (1 s), a linear probe on Inception pool features 0.905 with 500 training images (Inception
runs at 4-9 images/s here, so 2,400 images would take 5-10 minutes), and this CNN 0.983
(20 epochs, about 20 s). It reads any channel count and any size: images larger than
`JUDGE_SIDE` are area-averaged down to it first.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditforge.errors import UserError

JUDGE_VERSION = 1
JUDGE_SIDE = 32  # images are judged at most 32x32 (area-averaged): CIFAR's size, fast on a CPU
EPOCHS = 20
MIN_STEPS, MAX_STEPS = 200, 4000
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
SEED = 0


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class JudgeNet(nn.Module):
    """Three 3x3 conv blocks (32, 64, 128 channels, batch norm, ReLU), two 2x2 max pools, global
    average pool, dropout 0.2, a linear layer to the class logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.net = nn.Sequential(
            *_block(in_channels, 32), nn.MaxPool2d(2),  # (N, 32, S/2, S/2)
            *_block(32, 64), nn.MaxPool2d(2),  # (N, 64, S/4, S/4)
            *_block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 128)
            nn.Dropout(0.2), nn.Linear(128, num_classes),  # (N, K)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def judge_input(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> float32 (N, C, S, S), S = min(H, JUDGE_SIDE), area-averaged."""
    x = images.float().clamp(-1, 1)
    if max(x.shape[-2:]) > JUDGE_SIDE:
        x = F.adaptive_avg_pool2d(x, JUDGE_SIDE)
    return x


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The batch moved by up to 1/14 of its side in each direction (background -1 fills in)."""
    m = max(1, round(x.shape[-1] / 14))
    dy, dx = torch.randint(-m, m + 1, (2,), generator=g).tolist()
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    return torch.roll(padded, (dy, dx), (2, 3))[:, :, m:-m, m:-m]


@dataclass
class JudgeInfo:
    """What the cached judge was trained on and how well it reads real held-out images."""

    data: str
    num_classes: int
    in_channels: int
    train_count: int
    heldout_count: int
    heldout_accuracy: float
    heldout_per_class: list[float]
    steps: int
    seconds: float
    version: int = JUDGE_VERSION
    fid_real: dict | None = None  # {"count": N, "fid": ...}: real training images vs held-out (cached floor)


class Judge:
    def __init__(self, net: JudgeNet, info: JudgeInfo, device: torch.device):
        self.net, self.info, self.device = net.to(device).eval(), info, device

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """(N,) predicted class ids of (N, C, H, W) images in [-1, 1]."""
        if images.shape[1] != self.info.in_channels:
            raise UserError(f"the judge reads {self.info.in_channels}-channel images; got shape {tuple(images.shape)}")
        out = [
            self.net(judge_input(images[s : s + batch_size]).to(self.device)).argmax(1).cpu()
            for s in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, str(folder / "judge.safetensors.tmp"))
        (folder / "judge.safetensors.tmp").replace(folder / "judge.safetensors")
        self.save_info(folder)

    def save_info(self, folder: Path) -> None:
        tmp = folder / "judge.json.tmp"
        tmp.write_text(json.dumps(asdict(self.info), indent=2) + "\n")
        tmp.replace(folder / "judge.json")


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Share of each class's items predicted as that class (NaN for a class with no items)."""
    return [float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan") for c in range(num_classes)]


def train_judge(train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int, data: str,
                device: torch.device | str = "cpu") -> Judge:
    """Fit a JudgeNet on (N, C, H, W) images in [-1, 1]: AdamW, one-cycle learning rate, 20
    epochs (200..4000 steps) of batch 64, random shifts; deterministic for the data."""
    device = torch.device(device)
    x, y = judge_input(train_images), train_labels.long()
    if len(x) < 2 or num_classes < 2:
        raise UserError(f"the judge needs at least 2 classes and 2 training images; got {num_classes} classes, {len(x)} images")
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    net = JudgeNet(x.shape[1], num_classes).to(device).train()
    steps = int(np.clip(EPOCHS * len(x) // BATCH, MIN_STEPS, MAX_STEPS))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(steps):
        i = torch.randint(0, len(x), (min(BATCH, len(x)),), generator=g)
        logits = net(_shift(x[i], g).to(device))
        loss = F.cross_entropy(logits, y[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    info = JudgeInfo(data, num_classes, x.shape[1], len(x), 0, float("nan"), [], steps, time.perf_counter() - t0)
    return Judge(net, info, device)


def score_heldout(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Record how well the judge reads real held-out images (its ceiling) in its info."""
    pred, y = judge.predict(images), labels.numpy()
    judge.info.heldout_count = len(y)
    judge.info.heldout_accuracy = float((pred == y).mean()) if len(y) else float("nan")
    judge.info.heldout_per_class = per_class_accuracy(pred, y, judge.info.num_classes)


def load_judge(folder: Path, data: str, num_classes: int, in_channels: int, device: torch.device | str = "cpu") -> Judge | None:
    """The judge cached in `folder` if it was trained on this data by this version, else None."""
    meta, weights = folder / "judge.json", folder / "judge.safetensors"
    if not (meta.is_file() and weights.is_file()):
        return None
    from safetensors.torch import load_file

    info = JudgeInfo(**json.loads(meta.read_text()))
    if (info.version, info.data, info.num_classes, info.in_channels) != (JUDGE_VERSION, data, num_classes, in_channels):
        return None
    net = JudgeNet(in_channels, num_classes)
    net.load_state_dict(load_file(str(weights)))
    return Judge(net, info, torch.device(device))
