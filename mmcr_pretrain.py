"""MMCR pretraining of a CIFAR ResNet18: Maximum Manifold Capacity Representations.

Yerxa, Kuang, Simoncelli, Chung, NeurIPS 2023, https://arxiv.org/abs/2303.03307
Every image gets V augmented views; the loss is minus the nuclear norm of the matrix of the
per-image view centroids. The whole dataset lives on the device as uint8 and every view is
augmented there in one batch, so the GPU, not PIL on CPU workers, sets the speed.

    python mmcr_pretrain.py                                   # CIFAR-10, the reference's recipe, 500 epochs
    python mmcr_pretrain.py --dataset path/to/imagefolder     # train/<class>/* and test/<class>/*
    python mmcr_pretrain.py --max-epochs 50 --eval-every 5 --output-dir runs/mmcr/c10
    python mmcr_pretrain.py --resume auto --output-dir runs/mmcr/c10    # continue it after a stop or a crash
    torchrun --nproc_per_node 4 mmcr_pretrain.py              # same script, 4 GPUs (--batch-size is global)
    python mmcr_finetune.py --checkpoint runs/mmcr/c10/best.pt

Where to edit (a copy of this file is a complete program):
    the loss          mmcr_loss() in "loss"; main() calls it once, loss = mmcr_loss(z, cfg.lmbda), with z of shape
                      (images, views, dim)
    an augmentation   the op as a function in "augmentation", one line in augment_views(), its parameters in AUGMENT
    the model         ResNet18 and MMCRModel in "model" (--width widens the backbone; checkpoints record the
                      architecture, which mmcr_finetune.py builds)
    the recipe        Config below: every field is a flag
    the loop          main(): data -> views -> model -> loss -> backward -> optimizer step, then the epoch end
Everything below the "plumbing" line (flags, run folders, resume, DDP, files) can stay unread.

Outputs in --output-dir: config.json, metrics.jsonl, views.png, last.pt (resumable), best.pt (best kNN top-1).
Exit codes: 0 done, 2 bad input or an unwritable file (one line on stderr), 3 training diverged, 128 + signal after
Ctrl-C / SIGTERM.
"""
import contextlib
import dataclasses
import datetime
import fractions
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from knn import knn_accuracy

# the kind of checkpoint this script writes (a renamed copy keeps it, so mmcr_finetune.py reads its checkpoints too)
SCRIPT, RUNS = "mmcr_pretrain", "runs/mmcr"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # the method: edit these
    dataset: str = arg("cifar10", "cifar10, cifar100, or an ImageFolder root with train/<class>/* and test/<class>/*")
    batch_size: int = arg(64, "images per step over all GPUs (x num-views views)")
    num_views: int = arg(16, "augmented views per image")
    max_epochs: int = arg(500, "epochs of training")
    learning_rate: float = arg(1e-3, "Adam peak learning rate")
    weight_decay: float = arg(1e-6, "Adam (L2) weight decay")
    warmup_duration: float = arg(0.1, "fraction of all steps spent in linear warm-up before the cosine decay")
    width: int = arg(64, "channels of the ResNet18's first stage (64: the standard ResNet18, 512-d features)")
    projection_dim: int = arg(128, "output dimension of the projector")
    lmbda: float = arg(0.0, "weight of the mean per-image nuclear norm (0 in the paper's CIFAR runs)")
    grayscale_prob: float = arg(0.1, "probability of a grayscale view (0.1: the reference's RandomGrayscale(); "
                                "0.2: the MMCR paper)")
    solarize_threshold: float = arg(1 / 255, "solarize inverts pixels >= this, in [0, 1]: 1/255 is what the "
                                    "reference's RandomSolarize(0.5) does to uint8 PIL images (a colour negative); "
                                    "0.5: the textbook solarize")
    num_neighbours: int = arg(200, "k of the weighted kNN monitor")
    temperature: float = arg(0.5, "temperature of the weighted kNN monitor")
    eval_every: int = arg(1, "kNN evaluation every this many epochs (0: only after the last, always done)")
    image_size: int = arg(32, "side of the square training images")
    normalize: str = arg("auto", "auto: CIFAR's usual mean and std for cifar10 / cifar100, an ImageFolder's own "
                         "statistics otherwise; cifar10 or cifar100: those constants for any dataset (an ImageFolder "
                         "copy of CIFAR-10 normalised as the reference does); dataset: the training set's own")
    # the run: where, how, how often
    data_dir: str = arg("./data", "where CIFAR is downloaded and decoded ImageFolders are cached")
    output_dir: str = arg("", "run folder (default runs/mmcr/<timestamp>); one that holds a run needs --resume")
    resume: str = arg("", "a checkpoint to resume from, or 'auto' for <output-dir>/last.pt if it exists; the run "
                      "continues with the checkpoint's recipe")
    limit_train: int = arg(0, "use a random subset of this many training images (0 = all)")
    limit_test: int = arg(0, "use a random subset of this many test images (0 = all)")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool = arg(False, "torch.compile the model and the augmentation")
    log_every: int = arg(50, "steps between progress-bar updates, the loop's only host syncs (and steps 1, 2, 4...)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt inside an epoch this many minutes after the last save "
                                    "(0: only at epoch ends)")
    seed: int = arg(42, "random seed")


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    """Both splits of a dataset: images (uint8, N x 3 x S x S) or embeddings as x, int64 labels as y, class names."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list

    def to(self, device):
        return Data(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device), self.test_y.to(device),
                    self.classes)


def load_dataset(cfg):
    """The dataset of --dataset as Data on the CPU: CIFAR (downloaded into --data-dir) or an ImageFolder (decoded
    once, cached in --data-dir), resized to --image-size, cut to --limit-train / --limit-test."""
    if cfg.dataset in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train, test = (cls(cfg.data_dir, train=t, download=True) for t in (True, False))
        except Exception as e:
            raise UserError(f"could not load or download {cfg.dataset} into {cfg.data_dir} ({type(e).__name__}: {e}); "
                            f"offline, put the python version of the archive from "
                            f"https://www.cs.toronto.edu/~kriz/cifar.html into {cfg.data_dir}, "
                            f"or pass an ImageFolder root")
        split = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
                 for d in (train, test)]
        classes = train.classes
        if cfg.image_size != 32:
            resize = lambda x: F.interpolate(x.float(), size=cfg.image_size, mode="bicubic", antialias=True)
            split = [(resize(x).round().clamp(0, 255).byte(), y) for x, y in split]
    else:
        for s in ("train", "test"):
            if not os.path.isdir(os.path.join(cfg.dataset, s)):
                raise UserError(f"--dataset {cfg.dataset}: no folder {os.path.join(cfg.dataset, s)} "
                                f"(expected cifar10, cifar100 or an ImageFolder root with train/ and test/)")
        cache = os.path.join(cfg.data_dir, "cache")
        xtr, ytr, classes = load_image_folder(os.path.join(cfg.dataset, "train"), cfg.image_size, cache)
        xte, yte, test_classes = load_image_folder(os.path.join(cfg.dataset, "test"), cfg.image_size, cache)
        if test_classes != classes:
            raise UserError(f"--dataset {cfg.dataset}: train has classes {classes[:5]}... ({len(classes)}), "
                            f"test has {test_classes[:5]}... ({len(test_classes)})")
        split = [(xtr, ytr), (xte, yte)]
    # a fixed random subset keeps every class
    for i, limit in enumerate((cfg.limit_train, cfg.limit_test)):
        if 0 < limit < len(split[i][0]):
            keep = torch.randperm(len(split[i][0]), generator=torch.Generator().manual_seed(0))[:limit]
            split[i] = (split[i][0][keep], split[i][1][keep])
    return Data(*split[0], *split[1], list(classes))


# CIFAR-10's std is the reference's (0.2023, ...), widely copied from kuangliu/pytorch-cifar; the dataset's own
# pixel std is (0.2470, 0.2435, 0.2616). The first convolution and its BatchNorm absorb the difference.
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def normalization(kind, dataset, images):
    """(mean, std) per channel for --normalize: CIFAR's usual constants, or the uint8 images' own statistics."""
    name = dataset if kind == "auto" else kind
    if name in CIFAR_STATS:
        return CIFAR_STATS[name]
    # in chunks: no float copy of the whole training set
    n = images.shape[0] * images.shape[2] * images.shape[3]
    m1 = sum(c.double().sum((0, 2, 3)) for c in images.split(4096)) / (255 * n)
    m2 = sum(c.double().square().sum((0, 2, 3)) for c in images.split(4096)) / (255 ** 2 * n)
    return tuple(m1.tolist()), tuple((m2 - m1 ** 2).sqrt().tolist())


# ----------------------------------------------------------------------------- augmentation
# Every op takes a float batch (N, 3, H, W) in [0, 1] and per-view parameters, and matches
# torchvision.transforms.v2.functional applied to one image with those parameters (the tests check each op).


def sample_crops(draws, height, width, scale, ratio):
    """RandomResizedCrop.get_params for n views at once, from 22 uniform draws per view (n, 22): the area and
    the aspect of 10 tries, then the position. Returns (top, left, h, w) as integer-valued float tensors."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, :10])
    log_ratio = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[:, 10:20])
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torchvision takes the first of 10 tries that fits
    first = ok.float().argmax(1, keepdim=True)
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    # when no try fits: the whole image, clamped to the ratio range
    in_ratio = width / height
    fw = width if ratio[0] <= in_ratio <= ratio[1] else (width if in_ratio < ratio[0] else round(height * ratio[1]))
    fh = height if ratio[0] <= in_ratio <= ratio[1] else (round(width / ratio[0]) if in_ratio < ratio[0] else height)
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    top = torch.where(ok, (draws[:, 20] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(ok, (draws[:, 21] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return top, left, h, w


def resized_crop_flip(x, top, left, h, w, flip, size):
    """Crop each view to its box, resize to size x size (bilinear) and mirror where flip: one grid_sample."""
    n, _, height, width = x.shape
    # Output pixel centre u in [-1, 1] samples the source at left + (u + 1) / 2 * w (half-pixel centres,
    # as F.interpolate with align_corners=False); clamping to the box's first and last pixel centres
    # keeps the bilinear taps inside the box, as interpolate on the cropped image does.
    sx, sy = w / width, h / height
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], -1).view(n, 1, 1, 2)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], -1).view(n, 1, 1, 2)
    return F.grid_sample(x, grid.clamp(lo, hi), mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x):
    # ITU-R 601-2 luma, as torchvision
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def blend(x, factor, target):
    """factor * x + (1 - factor) * target, clamped to [0, 1], a factor per view: torchvision's _blend, behind
    brightness (target 0), contrast (the mean grey level) and saturation (the grey image)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * target).clamp(0, 1)


def adjust_brightness(x, b):
    return blend(x, b, 0.0)


def adjust_contrast(x, c):
    return blend(x, c, grayscale(x).mean((1, 2, 3), keepdim=True))


def adjust_saturation(x, s):
    return blend(x, s, grayscale(x))


def adjust_hue(x, hue):
    """RGB -> HSV (the formulas of torchvision's _rgb_to_hsv), rotate the hue by `hue` turns, HSV -> RGB.

    The way back uses the closed form channel_n = V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6
    with n = 5, 3, 1 for r, g, b (https://en.wikipedia.org/wiki/HSL_and_HSV#HSV_to_RGB_alternative):
    the same values as torchvision's sector table, without building six candidate planes (3x faster on CPU).
    """
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    eqc = maxc == minc
    sat = (maxc - minc) / torch.where(eqc, 1.0, maxc)
    rc, gc, bc = ((maxc - x) / torch.where(eqc, 1.0, maxc - minc)).unbind(1)
    r, g, _ = x.unbind(1)
    m = maxc[:, 0]
    h = torch.where(m == r, bc - gc, torch.where(m == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + hue.view(-1, 1, 1), 1.0) * 6
    k = torch.remainder(torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1) + h[:, None], 6.0)
    return maxc - maxc * sat * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma):
    """3x3 Gaussian blur with a per-view sigma, reflect padding (torchvision's gaussian_blur, kernel 3)."""
    # weight of the two side taps; the centre tap is 1
    k = torch.exp(-0.5 / sigma.view(-1, 1, 1, 1) ** 2)
    k0, k1 = k / (1 + 2 * k), 1 / (1 + 2 * k)
    p = F.pad(x, (1, 1, 0, 0), mode="reflect")
    x = k0 * p[..., :-2] + k1 * p[..., 1:-1] + k0 * p[..., 2:]
    p = F.pad(x, (0, 0, 1, 1), mode="reflect")
    return k0 * p[..., :-2, :] + k1 * p[..., 1:-1, :] + k0 * p[..., 2:, :]


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


def color_jitter(x, factors, hue, order):
    """ColorJitter with per-view parameters: brightness, contrast and saturation factors (N, 3), hue (N,), and
    order (N, 4), the op at each position (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's
    ColorJitter applies them in a random order. Factors 1 and hue 0 leave a view as it is."""
    # the factor of the op at each position (1 at hue's), and whether the position comes after hue
    at = torch.where(order < 3, factors.gather(1, order.clamp(max=2)), 1.0)
    after = torch.arange(4, device=x.device) > order.argsort(1)[:, 3:]
    kind = order.view(-1, 1, 4, 1, 1)
    for after_hue in (False, True):
        # the linear ops before hue sit at positions 0-2, those after it at 1-3
        for k in (range(1, 4) if after_hue else range(3)):
            # At position k each view runs the one blend found there (if it falls on this side of hue), in one
            # pass for all three kinds; the others get factor 1, an exact identity.
            factor = torch.where(after[:, k] == after_hue, at[:, k], 1.0)
            gray = grayscale(x)
            target = torch.where(kind[:, :, k] == 0, 0.0,
                                 torch.where(kind[:, :, k] == 1, gray.mean((1, 2, 3), keepdim=True), gray))
            x = blend(x, factor, target)
        if not after_hue:
            x = adjust_hue(x, hue)
    return x


def sample_jitter(draws, strength, p):
    """The parameters of color_jitter, as RandomApply([ColorJitter(*strength)], p) draws them: the identity for
    views whose coin did not come up."""
    apply = draws.coin(p)[:, None]
    order = draws.take(4).argsort(1)
    factors = torch.where(apply, torch.stack([draws.uniform(1 - j, 1 + j) for j in strength[:3]], 1), 1.0)
    hue = torch.where(apply[:, 0], draws.uniform(-strength[3], strength[3]), 0.0)
    return factors, hue, order


class Draws:
    """The uniform random numbers of a batch of views, (N, k) drawn at once, handed out in order: each op takes
    what it needs with take(n), uniform(lo, hi) or coin(p). Running out is an error that says what to raise."""

    def __init__(self, numbers):
        self.numbers, self.used = numbers, 0

    def take(self, n):
        if self.used + n > self.numbers.shape[1]:
            raise ValueError(f"augment_views takes more than the {self.numbers.shape[1]} random numbers per view that "
                             f"augment() draws: raise DRAWS")
        self.used += n
        return self.numbers[:, self.used - n:self.used]

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.take(1)[:, 0]

    def coin(self, p):
        return self.take(1)[:, 0] < p


def where(coin, changed, x):
    """changed for the views whose coin came up, x for the others."""
    return torch.where(coin.view(-1, 1, 1, 1), changed, x)


# Uniform random numbers drawn per view, more than augment_views takes (Draws says when it needs more).
DRAWS = 48


def augment(images, gen, aug):
    """A batch of uint8 images (N, 3, H, W) -> N independently augmented float views, normalised, channels_last.

    aug: the recipe (AUGMENT) with the run's size (of the views), norm ((mean, std) per channel) and compile. One
    call to the generator draws every random number of every view; augment_views turns them into views with tensor
    maths alone. Eager, that is a few hundred small kernels, which on a GPU take more time to launch than to run;
    with compile (--compile) torch.compile fuses them into a few.
    """
    numbers = torch.rand(images.shape[0], DRAWS, device=images.device, generator=gen)
    mean, std = channel_stats(*aug["norm"], images.device)
    return (compiled(augment_views) if aug.get("compile") else augment_views)(images, numbers, mean, std, aug)


def augment_views(images, numbers, mean, std, aug):
    """uint8 images (N, 3, H, W) and DRAWS uniform numbers per view -> the views, normalised with the (1, 3, 1, 1)
    tensors mean and std.

    The per-image pipeline of the reference code, every random parameter drawn per view: RandomResizedCrop and
    flip, ColorJitter (random order) with probability p_jitter, grayscale, Gaussian blur (sigma 0.1-2), solarize.

    To add an op: write it as batched tensor maths over all views (x: (N, 3, H, W) floats in [0, 1], a parameter
    per view), add one line here that takes its random numbers from `draws` and keeps it where its coin came up,
    x = where(draws.coin(aug["p_new"]), new_op(x, draws.uniform(lo, hi)), x), and its p_new to AUGMENT. No Python
    loop over views, no .item(), no random call: that keeps the GPU busy and the function compilable. This block
    is shared: copy an edit to the other scripts (test_shared_definitions_are_identical fails otherwise).
    """
    draws = Draws(numbers)
    x = images.float().div_(255)
    box = sample_crops(draws.take(22), x.shape[2], x.shape[3], aug["scale"], aug["ratio"])
    x = resized_crop_flip(x, *box, draws.coin(0.5), aug["size"])
    x = color_jitter(x, *sample_jitter(draws, aug["jitter"], aug["p_jitter"]))
    x = where(draws.coin(aug["p_gray"]), grayscale(x).expand(-1, 3, -1, -1), x)
    x = where(draws.coin(aug["p_blur"]), aug["blur"](x, draws.uniform(0.1, 2.0)), x)
    x = where(draws.coin(aug["p_solarize"]), solarize(x, aug["solarize_threshold"]), x)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# The reference's transforms run on PIL images, so RandomSolarize(0.5) compares uint8 values 0..255 with 0.5 and
# inverts every pixel >= 1: 1/255 here. RandomGrayscale() without p is torchvision's default p = 0.1.
AUGMENT = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.1,
               p_blur=0.1, blur=gaussian_blur, p_solarize=0.2, solarize_threshold=1 / 255)


@functools.lru_cache(maxsize=None)
def channel_stats(mean, std, device):
    """mean and std as (1, 3, 1, 1) tensors on the device, made once (a host-to-device copy per step stalls the GPU)."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1).float(),
            torch.tensor(std, device=device).view(1, 3, 1, 1).float())


def normalize(x, norm):
    """uint8 images or floats in [0, 1] -> standardised float images, channels_last; norm: (mean, std) per channel."""
    mean, std = channel_stats(*norm, x.device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def save_views(images, views, norm, path, rows=8, columns=8):
    """A PNG of the first `rows` images, each followed by its first `columns` views as the model gets them."""
    mean, std = channel_stats(*norm, views.device)
    rows = min(rows, len(images))
    size = views.shape[-1]
    shown = (views.float() * std + mean).clamp(0, 1).view(len(images), -1, 3, size, size)[:rows, :columns]
    originals = F.interpolate(images[:rows].float() / 255, size=(size, size), mode="bilinear", antialias=True)
    grid = torch.cat([originals[:, None], shown], 1).flatten(0, 1).cpu()
    atomic_write(path, lambda tmp: torchvision.utils.save_image(grid, tmp, nrow=1 + shown.shape[1], padding=1,
                                                                format="png"))


# ----------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, added to a shortcut (a 1x1 convolution and BatchNorm where the shape
    changes): torchvision's BasicBlock."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18(nn.Module):
    """torchvision's ResNet18 (its layer names and initialisation) for 32x32 images: a 3x3 stride-1 stem, no max-pool,
    no classifier. `width` channels in the first stage, 8 x width features (64: the standard ResNet18, 512-d)."""

    def __init__(self, width=64):
        super().__init__()
        self.width = width
        self.feature_dim = 8 * width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 4 * width, 1))
        self.layer4 = nn.Sequential(BasicBlock(4 * width, 8 * width, 2), BasicBlock(8 * width, 8 * width, 1))
        # torchvision's initialisation; the stem keeps PyTorch's default, as in the reference code, which replaces
        # torchvision's 7x7 stem after building the network
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.conv1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class MMCRModel(nn.Module):
    """ResNet18 -> projector Linear (no bias)-BN-ReLU-Linear: z, the embedding the loss sees."""

    def __init__(self, width, projection_dim):
        super().__init__()
        self.backbone = ResNet18(width)
        hidden = 2 * projection_dim
        self.projector = nn.Sequential(nn.Linear(self.backbone.feature_dim, hidden, bias=False),
                                       nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, projection_dim))
        # what mmcr_finetune.py reads from a checkpoint to rebuild the backbone
        self.architecture = {"backbone": type(self.backbone).__name__, "width": width,
                             "feature_dim": self.backbone.feature_dim, "projection_dim": projection_dim}

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------- loss


def mmcr_loss(z, lmbda=0.0):
    """MMCR loss of z (batch, views, dim): -||C||_* + lmbda * mean_b ||Z_b||_*, in float32.

    C stacks the per-image centroids of the L2-normalised views (Yerxa et al. 2023, eq. 3). Under DDP
    the centroids are all-gathered with autograd, so the nuclear norm is over the global batch.
    """
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1)
        # The CPU SVD raises on non-finite input where CUDA's returns NaN: on the CPU such a z becomes zeros and the
        # loss NaN, so that a diverged run stops at the next log step with exit code 3 (this check costs no GPU sync),
        # and DDP ranks still gather together.
        finite = z.device.type != "cpu" or bool(torch.isfinite(z).all())
        z = z if finite else torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        loss = -torch.linalg.svdvals(gather(z.mean(1))).sum()
        # the mean per-image nuclear norm, over the global batch too
        if lmbda:
            loss = loss + lmbda * gather(torch.linalg.svdvals(z).sum(-1)).mean()
        return loss if finite else loss * math.nan


class Gather(torch.autograd.Function):
    """all_gather along dim 0 with a backward that sums every rank's gradient and returns this rank's slice.

    Every rank computes the same global loss from the gathered tensor, so the summed gradient is
    world_size x the one-process gradient; DDP's average over ranks cancels that factor.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        # the gradients of transposed uses arrive strided
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(z):
    """Concatenate z over all DDP ranks along dim 0, with autograd (identity without DDP)."""
    return Gather.apply(z) if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else z


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def extract_features(backbone, images, norm, split, batch_size=1024):
    """Backbone features of uint8 images (no augmentation), in chunks, in eval mode, with a progress bar."""
    was_training = backbone.training
    backbone.eval()
    chunks = tqdm(images.split(batch_size), desc=f"features of {split}", leave=False, mininterval=1)
    features = torch.cat([backbone(normalize(chunk, norm)).float() for chunk in chunks])
    backbone.train(was_training)
    return features


def evaluate(cfg, model, data, aug, ctx):
    """{knn_top1, knn_top5} (%) of the backbone's features of the plain images, on rank 0 (None on the others)."""
    if not ctx.master:
        return None
    with ctx.autocast:
        train = extract_features(model.backbone, data.train_x, aug["norm"], "train")
        test = extract_features(model.backbone, data.test_x, aug["norm"], "test")
    top1, top5 = knn_accuracy(train, data.train_y, test, data.test_y, cfg.num_neighbours, cfg.temperature,
                              len(data.classes))
    return {"knn_top1": top1, "knn_top5": top5}


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def batch(order, i, batch_size, ctx):
    """This rank's share of the indices of the epoch's i-th batch (each rank: its slice of the same global batch)."""
    local = batch_size // ctx.world
    return order[i * batch_size + ctx.rank * local:][:local]


def main(cfg, given=frozenset()):
    # the run's recipe (the checkpoint's when resuming), its device and processes, its output folder (locked)
    control = RunControl(cfg, given)
    ctx = control.ctx

    # data: each split once on the device as uint8; the augmentation recipe with this run's flags
    with rank_zero_first(ctx):
        data = load_dataset(cfg).to(ctx.device)
    fit_batch_size(cfg, given, len(data.train_x), ctx)
    aug = dict(AUGMENT, p_gray=cfg.grayscale_prob, solarize_threshold=cfg.solarize_threshold, size=cfg.image_size,
               norm=normalization(cfg.normalize, cfg.dataset, data.train_x), compile=cfg.compile)
    # the last partial batch is dropped
    steps_per_epoch = len(data.train_x) // cfg.batch_size
    total_steps = cfg.max_epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_duration * total_steps)

    # model, optimizer, and their state when resuming
    model = MMCRModel(cfg.width, cfg.projection_dim).to(ctx.device, memory_format=torch.channels_last)
    # fused: one kernel, and no host sync under fp16
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=ctx.device.type == "cuda")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    gen = torch.Generator(ctx.device)
    control.restore(model=model, optimizer=optimizer, scaler=scaler)
    net = wrap(model, cfg, ctx)

    def checkpoint():
        """This script's state for last.pt / best.pt (the run control adds the step, the config and the best kNN)."""
        return {"model": model.state_dict(), "architecture": model.architecture, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "aug_rng": rng_states(gen, ctx), "classes": data.classes,
                "norm": aug["norm"]}

    control.start(checkpoint, model, steps_per_epoch, ("views", cfg.batch_size * cfg.num_views),
                  num_train=len(data.train_x), num_test=len(data.test_x), num_classes=len(data.classes),
                  steps_per_epoch=steps_per_epoch, norm=aug["norm"])
    for epoch in control.epochs():
        order = epoch_order(len(data.train_x), cfg.seed, epoch, ctx.device)
        seed_augmentation(gen, cfg.seed, epoch, ctx, control.saved("aug_rng", epoch))
        for step in control.steps(epoch):
            lr = set_lr(optimizer, lr_at(step, total_steps, warmup_steps, cfg.learning_rate))
            images = data.train_x[batch(order, step % steps_per_epoch, cfg.batch_size, ctx)]
            # the views of an image are consecutive: (images x views, 3, size, size)
            views = augment(images.repeat_interleave(cfg.num_views, 0), gen, aug)
            if step == 0 and ctx.master:
                save_views(images, views, aug["norm"], os.path.join(cfg.output_dir, "views.png"))
            with ctx.autocast:
                z = net(views).view(len(images), cfg.num_views, -1)
            loss = mmcr_loss(z, cfg.lmbda)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            control.step_done(loss, lr)
        # the end of an epoch (a stop inside it skips this): kNN, metrics.jsonl, checkpoints
        if control.epoch_complete:
            due = (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.max_epochs
            control.end_epoch(lambda: evaluate(cfg, model, data, aug, ctx) if due else None)
    control.finish()


# ----------------------------------------------------------------------------- plumbing
# Nothing below changes the method: errors and exit codes, flags, DDP, the run folder and its lock, resume, the run
# control around the loop, random states, files.


class UserError(Exception):
    """Bad input or a file that cannot be written: one line on stderr, exit code 2, never a traceback."""


class Diverged(Exception):
    """Non-finite weights: one line on stderr, exit code 3."""


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: one line on stderr (what was saved, how to continue), exit code 128 + the signal. A
    BaseException, as KeyboardInterrupt: no `except Exception` on its way may take it for an error."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def check_config(cfg):
    check_common(cfg)
    problems = [(cfg.num_views < 2, "--num-views must be at least 2 (MMCR averages views)"),
                (cfg.batch_size < 1, "--batch-size must be positive"),
                (cfg.max_epochs < 1, "--max-epochs must be at least 1"),
                (cfg.learning_rate <= 0 or cfg.weight_decay < 0,
                 "--learning-rate must be positive, --weight-decay >= 0"),
                (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
                (cfg.width < 1 or cfg.projection_dim < 1, "--width and --projection-dim must be positive"),
                (not 0 <= cfg.grayscale_prob <= 1 or not 0 <= cfg.solarize_threshold <= 1,
                 "--grayscale-prob and --solarize-threshold must be in [0, 1]"),
                (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
                (cfg.eval_every < 0 or cfg.log_every < 1, "--eval-every must be >= 0 and --log-every >= 1"),
                (cfg.image_size < 8, "--image-size must be at least 8"),
                (cfg.normalize not in ("auto", "cifar10", "cifar100", "dataset"),
                 "--normalize must be auto, cifar10, cifar100 or dataset"),
                (cfg.limit_train < 0 or cfg.limit_test < 0, "--limit-train and --limit-test must be >= 0"),
                (cfg.checkpoint_minutes < 0, "--checkpoint-minutes must be >= 0"),
                (cfg.device not in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
                (cfg.precision not in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
                (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda but no GPU is available")]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    # a run records where its data is, so that a resume or mmcr_finetune.py finds it from any directory
    if cfg.dataset not in ("cifar10", "cifar100"):
        cfg.dataset = os.path.abspath(cfg.dataset)
    cfg.data_dir = os.path.abspath(cfg.data_dir)


def check_common(cfg):
    """What every script checks: float flags are finite numbers (NaN passes every comparison unnoticed), and
    --resume auto names its folder."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise UserError("--resume auto needs --output-dir, the folder of the run to continue")


def parse_config(argv=None):
    """argparse generated from the dataclass (--batch-size for batch_size, help from the field): the Config and the
    names of the flags that the command line gave (a resume takes the others from its checkpoint)."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        shown = f"{f.metadata['help']} (default: {readable(f.default)})".replace("%", "%%")
        if f.type is bool or f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=shown)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(name, type=kind, help=shown)
    given = vars(parser.parse_args(argv))
    return Config(**given), frozenset(given)


def readable(value):
    """A default as a person writes it: 1/255 rather than 0.00392156862745098, 1e-06, '' as ''."""
    if isinstance(value, float):
        fraction = fractions.Fraction(value).limit_denominator(1000)
        if float(fraction) == value and fraction.denominator > 1 and len(repr(value)) > 8:
            return f"{fraction.numerator}/{fraction.denominator}"
        return f"{value:g}"
    return repr(value) if value == "" else value


@dataclass
class Context:
    """Where this process runs: its device, its rank among the `world` processes of a torchrun job (0 of 1 without
    one), and the precision of its forward passes: `with ctx.autocast:` runs one in it."""
    device: torch.device
    precision: str
    rank: int = 0
    world: int = 1
    ddp: bool = False
    # under DDP with NCCL, a gloo group for the host-side flags that the ranks agree on at every step
    cpu_group: object = None

    @property
    def master(self):
        return self.rank == 0

    @property
    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32")


def context(cfg, rank=0, world=1, ddp=False, cpu_group=None):
    """The Context of this process: its GPU (the LOCAL_RANK-th) if there is one and --device allows, else the CPU.
    Precision auto: bf16 where the GPU has it (compute capability 8+), fp16 with a GradScaler before, fp32 on a CPU."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "fp32" if not cuda else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    return Context(device, precision, rank, world, ddp, cpu_group)


def setup(cfg):
    """The Context, with DDP when torchrun set RANK: one process per GPU (NCCL) or per CPU process (gloo)."""
    if "RANK" not in os.environ:
        return context(cfg)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    # rank 0 evaluates (and decodes a new ImageFolder) while the others wait: allow that more than 10 minutes
    timeout = datetime.timedelta(hours=2)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return context(cfg, dist.get_rank(), dist.get_world_size(), True, cpu_group)


@contextmanager
def rank_zero_first(ctx):
    """Rank 0 runs the block first (a download, a decoding to cache), then the other ranks (which read the cache)."""
    if ctx.ddp and not ctx.master:
        dist.barrier()
    yield
    if ctx.ddp and ctx.master:
        dist.barrier()


def fit_batch_size(cfg, given, n, ctx):
    """A default --batch-size larger than the training set shrinks to it, with a note; a given one is an error."""
    if cfg.batch_size > n:
        if "batch_size" in given:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} images)")
        cfg.batch_size = n - n % ctx.world
        if ctx.master:
            print(f"note: --batch-size {cfg.batch_size}, the size of the training set (the default is larger)")
    if cfg.batch_size % ctx.world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world} processes")


def wrap(model, cfg, ctx):
    """What the training loop calls: the model, compiled with --compile, in DDP under torchrun. Checkpoints save the
    model itself."""
    if cfg.compile:
        model = torch.compile(model)
    if ctx.ddp:
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


# Flags that a resume may change: they do not change what the run computes. Every other flag comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_epochs", "eval_every", "log_every", "checkpoint_minutes", "device", "precision", "compile",
                     "data_dir", "output_dir", "resume"}
# What makes a folder hold a run: a checkpoint (config.json, views.png or metrics.jsonl alone do not: that run never
# saved, and a new one starts afresh)
RUN_FILES = ("last.pt", "best.pt")


class RunControl:
    """Everything around the training loop, so that main() shows the method: the recipe (the checkpoint's when
    resuming), the device and DDP (setup), the output folder (locked while the run lives), the progress bar, timed
    saves, stop requests (Ctrl-C, SIGTERM), the divergence check, metrics.jsonl, last.pt / best.pt and the epoch lines.
    Under DDP the ranks take every decision together."""

    def __init__(self, cfg, given):
        self.cfg, self.signals, self.stopping = cfg, [], False
        for s in (signal.SIGINT, signal.SIGTERM):
            RunControl.handlers.setdefault(s, signal.getsignal(s))
            signal.signal(s, self.on_signal)
        check_config(cfg)
        self.resume_path = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
        if cfg.resume == "auto" and not os.path.exists(self.resume_path):
            self.resume_path = ""
        self.resumed = load_checkpoint(self.resume_path, SCRIPT) if self.resume_path else None
        # a resume continues the checkpoint's recipe (device and precision too, unless the command line changes them)
        self.changed = adopt_recipe(cfg, given, self.resumed, self.resume_path) if self.resumed else {}
        self.ctx = setup(cfg)
        self.run_id = self.resumed.get("run_id") if self.resumed else uuid.uuid4().hex[:12]
        # a resume goes on in the checkpoint's own folder unless --output-dir says otherwise
        own = os.path.dirname(os.path.abspath(self.resume_path)) if self.resumed else ""
        cfg.output_dir = cfg.output_dir or own or os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S"))
        self.claim()
        self.step = self.resumed["step"] if self.resumed else 0
        self.best = self.resumed.get("best", {}) if self.resumed else {}
        # the step of the state that last.pt / best.pt hold
        self.file_steps = {"last.pt": self.step} if self.resumed else {}
        self.started, self.saved_step, self.pending, self.loss = self.step, None, False, torch.full((), math.nan)
        self.t_start = self.saved_at = time.time()

    # what release() gives back when the process is done with the run: signal handlers, output-folder locks
    handlers, locks = {}, []

    def on_signal(self, signum, frame):
        self.signals.append(signum)
        # the first one stops the run at the next step (or after the evaluation running now); a second quits at once
        if len(self.signals) > 1:
            raise Stopped(signum, f"interrupted again: quit at once; {self.kept()}")

    @classmethod
    def release(cls):
        """The previous signal handlers back, and the output folder's lock emptied and released."""
        for s, handler in cls.handlers.items():
            signal.signal(s, handler)
        cls.handlers.clear()
        while cls.locks:
            lock = cls.locks.pop()
            with contextlib.suppress(OSError, ValueError):
                lock.seek(0)
                lock.truncate()
                lock.close()

    def claim(self):
        """Rank 0 claims the output folder (claim_output_dir); every rank learns the outcome, the same folder or the
        same error."""
        outcome = [self.cfg.output_dir, None]
        if self.ctx.master:
            try:
                RunControl.locks.append(claim_output_dir(self.cfg.output_dir, self.resumed, self.run_id,
                                                         self.resume_path))
            except UserError as e:
                outcome[1] = str(e)
        if self.ctx.ddp:
            dist.broadcast_object_list(outcome, src=0, group=self.ctx.cpu_group)
        self.cfg.output_dir = outcome[0]
        if outcome[1]:
            raise UserError(outcome[1])

    def restore(self, **objects):
        """Resuming: load the checkpoint's saved states into the objects (model=..., optimizer=..., scaler=...)."""
        for name, obj in objects.items():
            state = self.resumed.get(name) if self.resumed else None
            # a GradScaler's state carries over only from fp16 to fp16
            if not self.resumed or (isinstance(obj, torch.amp.GradScaler) and not (obj.is_enabled() and state)):
                continue
            try:
                obj.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise UserError(f"{self.resume_path}: its {name} does not fit this script's: {problem_of(e)}")

    def start(self, checkpoint, model, steps_per_epoch, throughput, /, **info):
        """Before the first step: checkpoint() (the script's state to save), the model whose weights the divergence
        check reads, the steps per epoch, throughput (unit, count per step) for the progress bar and the metrics, and
        config.json: every flag and `info` (a resume adds a record of itself to the run's config.json). A resume from
        an epoch's end whose line metrics.jsonl lacks (a stop during its evaluation) runs that epoch's end first."""
        self.checkpoint, self.model, self.steps_per_epoch = checkpoint, model, steps_per_epoch
        self.unit, self.per_step = throughput
        if self.best.get("epoch"):
            self.file_steps["best.pt"] = self.best["epoch"] * steps_per_epoch
        pending = [False]
        if self.ctx.master:
            write_run_info(self.cfg, self.ctx, self.run_id, self.resumed, self.resume_path, self.changed, info)
            at_epoch_end = self.step > 0 and self.step % steps_per_epoch == 0
            pending[0] = bool(self.resumed) and at_epoch_end and self.step not in metrics_steps(self.cfg.output_dir)
        if self.ctx.ddp:
            dist.broadcast_object_list(pending, src=0, group=self.ctx.cpu_group)
        self.pending = pending[0]

    def saved(self, key, epoch):
        """The checkpoint's `key` (a random state) if `epoch` continues from it in the middle, else None."""
        mid_epoch = self.resumed and self.resumed["step"] % self.steps_per_epoch
        return self.resumed[key] if mid_epoch and epoch == self.resumed["step"] // self.steps_per_epoch else None

    def epochs(self):
        """The epochs still to run; after a stop request, a Stopped exception instead (exit code 128 + signal)."""
        epoch = self.step // self.steps_per_epoch - self.pending
        self.agree()
        while not self.stopping and epoch < self.cfg.max_epochs:
            yield epoch
            epoch += 1
        if self.stopping:
            raise self.stopped()

    def steps(self, epoch):
        """The steps of `epoch` still to run, with a progress bar; they end early, after a save, on a stop request."""
        self.epoch, self.first = epoch, max(self.step, epoch * self.steps_per_epoch)
        self.epoch_end = (epoch + 1) * self.steps_per_epoch
        self.loss_sum, self.t_epoch = torch.zeros((), device=self.ctx.device), time.time()
        self.bar = tqdm(total=self.steps_per_epoch, initial=self.first - epoch * self.steps_per_epoch,
                        desc=f"epoch {epoch + 1}/{self.cfg.max_epochs}", disable=not self.ctx.master, mininterval=1,
                        leave=False)
        with self.bar:
            for step in range(self.first, self.epoch_end):
                yield step
                if self.stopping:
                    return

    def step_done(self, loss, lr, **shown):
        """After each training step: at the log steps (the loop's only host syncs) check the weights and show the loss,
        lr, `shown` and the speed; save last.pt once --checkpoint-minutes have passed; note a stop request."""
        self.step += 1
        self.loss_sum += loss.detach()
        self.lr, self.loss = lr, loss
        self.bar.update()
        since = self.step - self.started
        if since % self.cfg.log_every == 0 or (since < self.cfg.log_every and since & (since - 1) == 0):
            self.check_finite()
            rate = (self.step - self.first) * self.per_step / (time.time() - self.t_epoch)
            values = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in dict(loss=loss, **shown).items()}
            self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in values.items()}, "lr": f"{lr:.2e}",
                                  f"{self.unit}/s": f"{rate:.0f}"})
        stop, timed, _ = self.agree()
        if (stop or timed) and self.step < self.epoch_end:
            self.save("last.pt")

    @property
    def epoch_complete(self):
        return self.step == self.epoch_end

    def end_epoch(self, evaluate):
        """After an epoch's last step: save last.pt (a long evaluation that fails or is killed loses no training), run
        evaluate() (None, or scores: best.pt keeps the best of its first value), add the epoch's line to metrics.jsonl,
        save best.pt (and last.pt, which records the best) when it improved, print the line."""
        seconds = elapsed(self.t_epoch, self.ctx.device)
        steps = self.step - self.first
        self.save("last.pt")
        scores = evaluate() or {}
        self.pending = False
        stats = {"epoch": self.epoch + 1, "step": self.step, "loss": self.loss_sum.item() / steps if steps else None,
                 "lr": self.lr if steps else None, **scores, "epoch_seconds": round(seconds, 3),
                 f"{self.unit}_per_second": round(steps * self.per_step / seconds, 1)}
        key = next(iter(scores), None)
        improved = key is not None and scores[key] > self.best.get(key, -math.inf)
        if improved:
            self.best = dict(scores, epoch=self.epoch + 1)
        if self.ctx.master:
            append_metrics(self.cfg.output_dir, stats)
        # a stop requested during the evaluation ends the run after this epoch; every rank saves when rank 0 improved
        if self.agree(improved)[2]:
            self.save("best.pt", "last.pt")
        if self.ctx.master:
            shown = in_words({k: v for k, v in stats.items() if k not in ("epoch", "step") and "second" not in k})
            print(f"epoch {self.epoch + 1}/{self.cfg.max_epochs} step {self.step} {shown} {seconds:.1f}s "
                  f"{stats[f'{self.unit}_per_second']:.0f} {self.unit}/s", flush=True)

    def finish(self):
        if self.ctx.master:
            best = in_words({k: v for k, v in self.best.items() if k != "epoch"})
            print(f"done: best {best or '-'} (epoch {self.best.get('epoch', '-')}) in "
                  f"{time.time() - self.t_start:.1f}s; checkpoints in {self.cfg.output_dir}")

    def agree(self, vote=False):
        """(stop, timed save, vote): a stop was requested; --checkpoint-minutes have passed since the last save (rank
        0's clock); some rank voted. Decided on the host at every step, with no GPU sync, and all-reduced under DDP."""
        minutes = self.cfg.checkpoint_minutes
        flags = [len(self.signals) > 0, self.ctx.master and 0 < minutes <= (time.time() - self.saved_at) / 60, vote]
        if self.ctx.ddp:
            votes = torch.tensor(flags, dtype=torch.float)
            dist.all_reduce(votes, group=self.ctx.cpu_group)
            flags = (votes > 0).tolist()
        self.stopping = flags[0]
        return flags

    def check_finite(self):
        """Diverged once the weights are not finite (their sum is not): a GPU sync, so at log steps and saves only."""
        weights = sum(p.detach().float().sum() for p in self.model.parameters())
        bad = (~torch.isfinite(weights)).float()
        if self.ctx.ddp:
            dist.all_reduce(bad)
        if bad.item():
            raise Diverged(f"training diverged at step {self.step}: the loss is {self.loss.item():.4g} and the weights "
                           f"are no longer finite; {self.kept()}. Try a lower --learning-rate in a new "
                           f"--output-dir, or --precision bf16 or fp32 if this ran in fp16 (a resume may change it)")

    def save(self, *names):
        """Write the checkpoint of this step as each of names (rank 0; every rank builds it, a collective under DDP),
        never with weights that are not finite."""
        self.check_finite()
        ckpt = dict(self.checkpoint(), script=SCRIPT, run_id=self.run_id, step=self.step,
                    epoch=self.step // self.steps_per_epoch, best=self.best, config=dataclasses.asdict(self.cfg))
        if self.ctx.master:
            for name in names:
                atomic_save(ckpt, os.path.join(self.cfg.output_dir, name))
                self.file_steps[name] = self.step
        self.saved_step, self.saved_at = self.step, time.time()

    def kept(self):
        """What the run folder holds to go on from, in words."""
        kept = [f"{name} (step {self.file_steps.get(name, '?')})" for name in ("last.pt", "best.pt")
                if os.path.exists(os.path.join(self.cfg.output_dir, name))]
        if not kept:
            return "nothing was saved, so the folder can take a new run"
        return f"{' and '.join(kept)} in {self.cfg.output_dir} keep the last finite state"

    def stopped(self):
        signum = self.signals[0] if self.signals else signal.SIGTERM
        if not os.path.exists(os.path.join(self.cfg.output_dir, "last.pt")):
            return Stopped(signum, "interrupted before the first save: nothing to continue")
        what = (f"saved {os.path.join(self.cfg.output_dir, 'last.pt')} at step {self.saved_step}"
                if self.saved_step is not None else f"stopped before training went on; {self.kept()}")
        launcher = f"torchrun --nproc_per_node {self.ctx.world}" if self.ctx.ddp else "python"
        return Stopped(signum, f"interrupted: {what}; continue with {launcher} {shlex.quote(sys.argv[0])} "
                               f"--resume auto --output-dir {shlex.quote(self.cfg.output_dir)}")


def in_words(values):
    """'loss -4.1234 lr 1.00e-03 knn_top1 57.20': metrics for a log line (None left out)."""
    return " ".join(f"{k} {v:.4f}" if "loss" in k else f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.2f}"
                    for k, v in values.items() if v is not None)


def problem_of(error):
    """The line of a load_state_dict error that says what is wrong (its first line only names the module)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[min(1, len(lines) - 1)][:200]


def adopt_recipe(cfg, given, ckpt, path):
    """A resume continues the run's recipe: every flag comes from the checkpoint's config but those in
    RESUME_MAY_CHANGE that the command line gives. Another value for any other flag is a UserError that lists them.
    Returns {flag: [the run's value, the new one]} of the changes made."""
    saved = ckpt["config"]
    if cfg.dataset not in ("cifar10", "cifar100") and "dataset" in saved:
        saved = dict(saved, dataset=os.path.abspath(saved["dataset"]) if saved["dataset"] else "")
    differ = sorted(n for n in given if n not in RESUME_MAY_CHANGE and n in saved and saved[n] != getattr(cfg, n))
    if differ:
        listed = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (the run's: {saved[n]})" for n in differ)
        raise UserError(f"{path} continues its run's recipe, and the command line changes it: {listed}; leave these "
                        f"flags out to continue the run, or start a new run in another --output-dir")
    changed = {n: [saved[n], getattr(cfg, n)] for n in sorted(given & RESUME_MAY_CHANGE - {"resume", "output_dir"})
               if n in saved and saved[n] != getattr(cfg, n)}
    for f in dataclasses.fields(cfg):
        if f.name in saved and f.name not in given and f.name not in ("resume", "output_dir"):
            setattr(cfg, f.name, saved[f.name])
    return changed


def claim_output_dir(output_dir, resumed, run_id, resume_path):
    """Create --output-dir and lock it while this process lives (rank 0; the lock file .lock holds its PID). Refused,
    changing nothing: a folder another live process holds; a new run into a folder that holds a run; a resume into a
    folder that holds another run (another run id). A lock left by a dead process is taken over with a warning."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output-dir {output_dir}: {e.strerror}")
    check_output_dir(output_dir, resumed, run_id, resume_path)
    try:
        lock = open(os.path.join(output_dir, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {output_dir}: {e.strerror}")
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        # no fcntl (Windows): no lock
        pass
    except OSError:
        lock.seek(0)
        holder = (lock.read().split() or ["?"])[0]
        raise UserError(f"--output-dir {output_dir} is in use by another run (PID {holder}); wait for it to end, "
                        f"or choose another --output-dir")
    # the holder's files may have appeared while this process waited for the lock
    check_output_dir(output_dir, resumed, run_id, resume_path)
    lock.seek(0)
    previous = lock.read().split()
    if previous:
        print(f"warning: --output-dir {output_dir} was locked by PID {previous[0]}, which ended without releasing it "
              f"(a crash or a kill); taking it over", file=sys.stderr)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    lock.flush()
    # RunControl.release() empties the lock file at the end; the kernel releases the lock when the process ends, in
    # any way (a kill leaves the PID in the file: the next run warns)
    return lock


def check_output_dir(output_dir, resumed, run_id, resume_path):
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if held and not resumed:
        raise UserError(f"--output-dir {output_dir} already holds a run ({', '.join(held)}): pass --resume auto to "
                        f"continue it, or choose another --output-dir")
    folder_run = folder_run_id(output_dir) if held else run_id
    if folder_run != run_id:
        raise UserError(f"--output-dir {output_dir} holds another run (run id {folder_run}) than {resume_path} (run id "
                        f"{run_id}): resume into that run's own folder, or into an empty one")


def folder_run_id(output_dir):
    """The run id of the run a folder holds (from config.json, else last.pt), None if it has none."""
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        path = os.path.join(output_dir, "last.pt")
        return load_checkpoint(path, SCRIPT).get("run_id") if os.path.exists(path) else None


def write_run_info(cfg, ctx, run_id, resumed, resume_path, changed, info):
    """config.json: the run id, every flag and what was derived from them (`info`), also printed. A resume keeps the
    run's config.json and appends a record: when, from which checkpoint and step, which flags it changed.
    metrics.jsonl keeps only the lines up to the checkpoint's step (none for a new run), so no epoch is listed twice."""
    path = os.path.join(cfg.output_dir, "config.json")
    derived = dict(world_size=ctx.world, device=str(ctx.device), precision_used=ctx.precision, **info)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    run = {"run_id": run_id, "started": now, **dataclasses.asdict(cfg), **derived}
    if resumed:
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                previous = json.load(f)
            run = previous if previous.get("run_id") == run_id else run
        record = {"at": now, "from": os.path.abspath(resume_path), "step": resumed["step"], "changed": changed,
                  **{k: derived[k] for k in ("world_size", "device", "precision_used")}}
        run.setdefault("resumes", []).append(record)
        print(f"resumed from {resume_path} at step {resumed['step']}" + (f", changing {changed}" if changed else ""))
    keep_metrics_until(cfg.output_dir, resumed["step"] if resumed else 0)
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(run, indent=2)))
    print(json.dumps(dict(dataclasses.asdict(cfg), **derived)))


def metrics_lines(output_dir):
    """The lines of metrics.jsonl as dicts; a line that is not JSON (cut off by a crash) is left out."""
    lines = []
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
    return [line for line in lines if isinstance(line, dict) and isinstance(line.get("step"), int)]


def metrics_steps(output_dir):
    return {line["step"] for line in metrics_lines(output_dir)}


def keep_metrics_until(output_dir, step):
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        kept = "".join(json.dumps(line) + "\n" for line in metrics_lines(output_dir) if line["step"] <= step)
        atomic_write(path, lambda tmp: write_text(tmp, kept))


def append_metrics(output_dir, stats):
    """One JSON line per epoch; a failed append (a full disk) is cut off again, leaving no half line."""
    path = os.path.join(output_dir, "metrics.jsonl")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror})")
    line = (json.dumps(stats) + "\n").encode()
    try:
        size = os.fstat(fd).st_size
        if os.write(fd, line) != len(line):
            raise OSError(28, "a short write")
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise UserError(f"cannot write {path} ({e.strerror}: is the disk full?); it keeps the lines before")
    finally:
        os.close(fd)


def epoch_order(n, seed, epoch, device):
    """The epoch's order of the training set: a pure function of (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def seed_augmentation(gen, seed, epoch, ctx, saved=None):
    """The augmentation RNG at an epoch's start: a pure function of (seed, epoch, rank). A mid-epoch resume restores
    the state saved in the checkpoint instead, if it came from as many ranks on the same kind of device."""
    if saved is not None and len(saved) == ctx.world and saved[ctx.rank].numel() == gen.get_state().numel():
        gen.set_state(saved[ctx.rank])
    else:
        gen.manual_seed(seed * 100003 + epoch * 1009 + ctx.rank)


def rng_states(gen, ctx):
    """Every rank's generator state, for the checkpoint (a collective under DDP)."""
    states = [gen.get_state().cpu()]
    if ctx.ddp:
        states = [None] * ctx.world
        dist.all_gather_object(states, gen.get_state().cpu())
    return states


def set_lr(optimizer, lr):
    """Write lr into every param group (times its lr_scale, if it has one); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile(fn), made once per function; a run's shapes are fixed, so no dynamic shapes."""
    return torch.compile(fn, dynamic=False)


def elapsed(t, device):
    """Seconds since t, once the queued GPU work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - t


def atomic_write(path, write):
    """write(tmp), then os.replace(tmp, path): a kill never leaves a broken file. A failed write (a full or read-only
    disk) removes tmp and is a UserError that names the file and says whether the previous one is kept."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        # on disk before the rename, so that a power cut or a crashed machine also leaves the old file or the new one
        fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            fsync(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or ["?"])[-1]
        kept = f"; the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else ""
        raise UserError(f"cannot write {path} ({reason.strip()[:160]}: is the disk full or read-only?){kept}") from None


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch_file(path, what):
    """torch.load of a file these scripts wrote (tensors, numbers, strings only); missing or broken: a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable {what}: corrupt, truncated or not written by torch.save "
                        f"({type(e).__name__})")


def load_checkpoint(path, script):
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"script", "model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    return ckpt


_cache_warned = []


def load_image_folder(root, image_size, cache_dir):
    """Decode root/<class>/* once into uint8 (N, 3, S, S); cached by file list, sizes and mtimes."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for label, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for n in sorted(names):
                # like torchvision's ImageFolder, skip non-images
                if n.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(label)
    if not files:
        raise UserError(f"no images found in {root} (expected {root}/<class>/<image>.jpg|png|...)")
    present = set(labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    # as torchvision's ImageFolder: a class without images is an error, not a silent extra output
    if empty:
        raise UserError(f"no images in the class folders {[os.path.join(root, c) for c in empty][:5]}")
    listing = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha1(repr((os.path.abspath(root), image_size, listing)).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"imagefolder-{key}.pt")
    if os.path.exists(cache):
        # a cache must never break a run: one that is truncated, corrupt or stale is decoded again
        try:
            d = torch.load(cache, weights_only=True)
            if d["images"].shape == (len(files), 3, image_size, image_size) and d["labels"].tolist() == labels:
                return d["images"], d["labels"], d["classes"]
            problem = "it does not match the image folder"
        except Exception as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'unreadable'}"
        print(f"warning: cannot use the cached decoded images {cache} ({problem}); removing it and decoding again",
              file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(cache)
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    unreadable = []
    for i, path in enumerate(tqdm(files, desc=f"decoding {root}", unit="img", mininterval=1, leave=False)):
        try:
            with Image.open(path) as im:
                # grayscale, palette and RGBA all occur in the wild
                im = im.convert("RGB")
                # shorter side to image_size, then centre crop
                if im.size != (image_size, image_size):
                    s = image_size / min(im.size)
                    w, h = max(image_size, round(im.size[0] * s)), max(image_size, round(im.size[1] * s))
                    im = im.resize((w, h), Image.BICUBIC)
                    left, top = (w - image_size) // 2, (h - image_size) // 2
                    im = im.crop((left, top, left + image_size, top + image_size))
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                images[i] = pixels.view(image_size, image_size, 3).permute(2, 0, 1)
        except Exception as e:
            unreadable.append(f"{path} ({e})")
    if unreadable:
        more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        raise UserError(f"cannot read {len(unreadable)} images: {'; '.join(unreadable[:10])}{more}")
    labels = torch.tensor(labels, dtype=torch.long)
    # the cache is optional: a full or read-only --data-dir costs a decoding next time, not this run
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save({"images": images, "labels": labels, "classes": classes}, cache)
    except (OSError, UserError) as e:
        if not _cache_warned:
            _cache_warned.append(cache_dir)
            print(f"warning: cannot cache the decoded images in {cache_dir} ({e}); the next run decodes again",
                  file=sys.stderr)
    return images, labels, classes


def cli(argv=None):
    """main() as a command: exit code 0 when done; bad input or an unwritable file 2, divergence 3, Ctrl-C / SIGTERM
    128 + the signal, each with one line on stderr."""
    cfg, given = parse_config(argv)
    code, message = 0, None
    try:
        main(cfg, given)
    except (UserError, OSError) as e:
        code, message = 2, f"{os.path.basename(__file__)}: error: {e}"
    except Diverged as e:
        code, message = 3, f"{os.path.basename(__file__)}: error: {e}"
    except Stopped as e:
        code, message = 128 + e.signum, str(e)
    except dist.DistBackendError:
        # under torchrun: another process ended (rank 0 says why), which broke this one's collective
        code, message = 1, f"{os.path.basename(__file__)}: rank {dist.get_rank()}: stopped, as another process ended"
    finally:
        RunControl.release()
        # a progress bar left open would take the message onto its line
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    # under torchrun rank 0 speaks for all ranks, which reach the same end
    ddp = dist.is_available() and dist.is_initialized()
    if message and (not ddp or dist.get_rank() == 0 or code == 1):
        print(message, file=sys.stderr)
    if ddp:
        # a process group left to the interpreter's exit aborts the process
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
