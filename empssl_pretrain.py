"""EMP-SSL pretraining of a CIFAR ResNet18 in one epoch: Extreme Multi-Patch Self-Supervised Learning.

Tong, Chen, Ma, LeCun 2023, https://arxiv.org/abs/2304.03977, official code https://github.com/tsb0601/EMP-SSL
Every image gives P small patches; the loss is the total coding rate of each patch across the batch plus
the cosine similarity of every patch to its image's patch centroid. Evaluation embeds an image as the mean
of the 4096-d embeddings of 128 patches (bag of features). The whole dataset lives on the device as uint8
and every patch is augmented there in one batch, so the GPU, not PIL on CPU workers, sets the speed.

    python empssl_pretrain.py                                 # CIFAR-10, the reference's recipe: 1 epoch, 20 patches
    python empssl_pretrain.py --dataset path/to/imagefolder   # train/<class>/* and test/<class>/*
    python empssl_pretrain.py --output-dir runs/empssl/c10 --resume auto    # continue it after a stop or a crash
    torchrun --nproc_per_node 4 empssl_pretrain.py            # same script, 4 GPUs (--batch-size is global)
    python empssl_linear.py --dataset runs/empssl/<run>/embeddings

Outputs in --output-dir: config.json, metrics.jsonl, views.png, last.pt (resumable), best.pt (best kNN top-1),
embeddings/{train,test}.pt (bag-of-features embeddings of every image, the input of empssl_linear.py).
Exit codes: 0 done, 2 bad input (one line on stderr), 3 training diverged, 128 + signal after Ctrl-C / SIGTERM.
"""
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
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

# checkpoints name the script that wrote them
SCRIPT, RUNS = "empssl_pretrain", "runs/empssl"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # the method: edit these
    dataset: str = arg("cifar10", "cifar10, cifar100, or an ImageFolder root with train/<class>/* and test/<class>/*")
    batch_size: int = arg(100, "images per step over all GPUs (x train-patches views)")
    train_patches: int = arg(20, "patches per image in training")
    valid_patches: int = arg(128, "patches per image averaged into the bag-of-features embedding for evaluation")
    max_epochs: int = arg(1, "epochs of training")
    learning_rate: float = arg(0.3, "LARS (SGD, momentum 0.9, nesterov) peak learning rate")
    weight_decay: float = arg(1e-4, "weight decay of the LARS-adapted weights (biases and norm parameters get none)")
    warmup_duration: float = arg(0.0, "fraction of all steps spent in linear warm-up before the cosine decay")
    hidden_dim: int = arg(4096, "width of the embedding used for evaluation and of the projector")
    projection_dim: int = arg(1024, "output dimension of the projector (the loss's space)")
    invariance_coefficient: float = arg(200.0, "weight of the patch similarity against the total coding rate")
    tcr_eps: float = arg(0.2, "distortion eps of the total coding rate")
    blur: str = arg("pil", "pil: PIL's GaussianBlur(radius=sigma), as the reference and the official code; "
                    "kernel3: torchvision's 3x3 kernel")
    unscaled_inputs: bool = arg(False, "the bartoszzuk reference's inputs: pixels 0..255 (ToDtype without scale) "
                                "before Normalize(0.5, 0.5), so in [-1, 509]; the default, [-1, 1], is the official "
                                "code's")
    num_neighbours: int = arg(20, "k of the weighted kNN evaluation")
    temperature: float = arg(0.07, "temperature of the weighted kNN evaluation")
    eval_every: int = arg(0, "bag-of-features kNN every this many epochs (0: only after the last, always done)")
    image_size: int = arg(32, "side of the square training images")
    # the run: where, how, how often
    data_dir: str = arg("./data", "where CIFAR is downloaded and decoded ImageFolders are cached")
    output_dir: str = arg("", "run folder (default runs/empssl/<timestamp>); one that holds a run needs --resume")
    resume: str = arg("", "a checkpoint to resume from, or 'auto' for <output-dir>/last.pt if it exists")
    limit_train: int = arg(0, "use a random subset of this many training images (0 = all)")
    limit_test: int = arg(0, "use a random subset of this many test images (0 = all)")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool = arg(False, "torch.compile the model and the augmentation")
    log_every: int = arg(50, "steps between progress-bar updates (the only host syncs of the loop)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt inside an epoch, at a log step, this many minutes "
                                    "after the last save (0: only at epoch ends)")
    seed: int = arg(42, "random seed")


# ----------------------------------------------------------------------------- data

def load_dataset(cfg):
    """(train_images, train_labels, test_images, test_labels, classes); images uint8 on CPU."""
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
    return split[0][0], split[0][1], split[1][0], split[1][1], list(classes)


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


def adjust_brightness(x, b):
    return (x * b.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x, c):
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    c = c.view(-1, 1, 1, 1)
    return (c * x + (1 - c) * mean).clamp(0, 1)


def adjust_saturation(x, s):
    s = s.view(-1, 1, 1, 1)
    return (s * x + (1 - s) * grayscale(x)).clamp(0, 1)


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


def pil_gaussian_blur(x, sigma, max_sigma=2.0, passes=3):
    """PIL's ImageFilter.GaussianBlur(radius=sigma) with a per-view sigma <= max_sigma.

    Pillow (BoxBlur.c) blurs with `passes` box blurs along the rows, then as many along the columns,
    each repeating the edge pixels. The box has radius l + a: l whole taps each side plus an outer
    tap of weight a, chosen so that the passes have variance sigma^2 (Gwosdek et al. 2011, eqs. 7-14,
    https://www.mia.uni-saarland.de/Publications/gwosdek-ssvm11.pdf). At sigma 2 the result spans
    13 pixels, where torchvision's GaussianBlur(3) spans 3.
    """
    n, c, height, width = x.shape
    var = (sigma.float() ** 2 / passes).view(-1, 1)
    whole = ((torch.sqrt(12 * var + 1) - 1) / 2).floor()
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    # the widest box any sigma <= max_sigma needs, from the sigma alone: no host sync
    r = math.floor((math.sqrt(12 * max_sigma ** 2 / passes + 1) - 1) / 2) + 1
    offset = torch.arange(-r, r + 1, device=x.device).abs().view(1, -1)
    taps = torch.where(offset <= whole, 1.0, torch.where(offset == whole + 1, frac, 0.0)) / (2 * whole + 1 + 2 * frac)
    taps = taps.repeat_interleave(c, 0)
    # one group per view and channel: each gets its own kernel in a single depthwise convolution
    y = x.reshape(1, n * c, height, width)
    for shape, pad in (((n * c, 1, 1, 2 * r + 1), (r, r, 0, 0)), ((n * c, 1, 2 * r + 1, 1), (0, 0, r, r))):
        for _ in range(passes):
            y = F.conv2d(F.pad(y, pad, mode="replicate"), taps.view(shape), groups=n * c)
    return y.view(n, c, height, width)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


def color_jitter(x, factors, hue, order):
    """ColorJitter with per-view parameters: brightness, contrast and saturation factors (N, 3), hue (N,), and
    order (N, 4), the op at each position (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's
    ColorJitter applies them in a random order. Factors 1 and hue 0 leave a view as it is."""
    position = order.argsort(1)
    for after_hue in (False, True):
        # the linear ops before hue sit at positions 0-2, those after it at 1-3
        for k in (range(1, 4) if after_hue else range(3)):
            op = order[:, k:k + 1]
            # at position k only the op found there runs (on this side of hue); the others get the exact identity
            runs = (op == torch.arange(3, device=x.device)) & ((k > position[:, 3:]) == after_hue)
            b, c, s = torch.where(runs, factors, 1.0).unbind(1)
            x = adjust_saturation(adjust_contrast(adjust_brightness(x, b), c), s)
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


def augment(images, gen, mean, std, size, compile=False, **aug):
    """A batch of uint8 images (N, 3, H, W) -> N independently augmented, normalised float views.

    One call to the generator draws every random number of every view; augment_views turns them into views
    with tensor maths alone. Eager, that is a few hundred small kernels, which on a GPU take more time to launch
    than to run; with compile=True (--compile) torch.compile fuses them into a few.
    """
    numbers = torch.rand(images.shape[0], DRAWS, device=images.device, generator=gen)
    m, s = channel_stats(tuple(mean), tuple(std), images.device)
    return (compiled(augment_views) if compile else augment_views)(images, numbers, m, s, size, aug)


def augment_views(images, numbers, mean, std, size, aug):
    """uint8 images (N, 3, H, W) and DRAWS uniform numbers per view -> the views, normalised with the (1, 3, 1, 1)
    tensors mean and std; aug: the recipe (AUGMENT).

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
    x = resized_crop_flip(x, *box, draws.coin(0.5), size)
    x = color_jitter(x, *sample_jitter(draws, aug["jitter"], aug["p_jitter"]))
    x = where(draws.coin(aug["p_gray"]), grayscale(x).expand(-1, 3, -1, -1), x)
    x = where(draws.coin(aug["p_blur"]), aug["blur"](x, draws.uniform(0.1, 2.0)), x)
    x = where(draws.coin(aug["p_solarize"]), solarize(x, aug["solarize_threshold"]), x)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# The reference solarizes PIL images with ImageOps.solarize's default threshold 128 (of 255) and blurs them with
# PIL's GaussianBlur(radius=sigma); the official EMP-SSL code (dataset/aug.py) does the same.
AUGMENT = dict(scale=(0.25, 0.25), ratio=(1.0, 1.0), jitter=(0.4, 0.4, 0.4, 0.2), p_jitter=0.8, p_gray=0.2, p_blur=0.1,
               blur=pil_gaussian_blur, p_solarize=0.1, solarize_threshold=128 / 255)


@functools.lru_cache(maxsize=None)
def channel_stats(mean, std, device):
    """mean and std as (1, 3, 1, 1) tensors on the device, made once (a host-to-device copy per step stalls the GPU)."""
    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


def normalize(x, mean, std):
    """uint8 images or floats in [0, 1] -> standardised float views, channels_last."""
    m, s = channel_stats(tuple(mean), tuple(std), x.device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def save_views(images, views, mean, std, path, rows=8, columns=8):
    """A PNG of the first `rows` images, each followed by its first `columns` views as the model gets them."""
    m, s = channel_stats(tuple(mean), tuple(std), views.device)
    rows, size = min(rows, len(images)), views.shape[-1]
    per_image = len(views) // len(images)
    shown = (views.float() * s + m).clamp(0, 1).view(len(images), per_image, 3, size, size)[:rows, :columns]
    originals = F.interpolate(images[:rows].float() / 255, size=(size, size), mode="bilinear", antialias=True)
    grid = torch.cat([originals[:, None], shown], 1).flatten(0, 1)
    torchvision.utils.save_image(grid.cpu(), path, nrow=1 + shown.shape[1], padding=1)


# ----------------------------------------------------------------------------- model


def cifar_resnet18():
    """torchvision ResNet18 with a 3x3 stride-1 stem and no max-pool (32x32 inputs); fc removed: 512-d."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class EMPSSLModel(nn.Module):
    """backbone -> Linear-BN-ReLU = the hidden_dim embedding h (evaluation) -> Linear-BN-ReLU-Linear = z (loss)."""

    def __init__(self, hidden_dim, projection_dim):
        super().__init__()
        self.backbone = cifar_resnet18()
        self.pre_feature = nn.Sequential(nn.Linear(512, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
        self.projector = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, projection_dim))

    def forward(self, x):
        h = self.pre_feature(self.backbone(x))
        # The projector runs in float32, so that under bf16 autocast the loss's inputs keep more than 8 bits of
        # mantissa (the reference's fp16 keeps 11; TF32 matmuls on a GPU keep 10). It costs about 1 ms a step.
        with torch.autocast(x.device.type, enabled=False):
            return h, self.projector(h.float())


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017, https://arxiv.org/abs/1708.03888).

    As the LARS wrapper of the EMP-SSL code: for every weight with ndim > 1 the gradient gets weight decay
    and is scaled by the trust ratio trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||), divided
    by the learning rate and clipped at 1, so the effective rate is min(trust ratio, lr). Biases and norm
    parameters (ndim 1) get neither adaptation nor weight decay. Then plain SGD with (nesterov) momentum.
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, nesterov=True, trust_coefficient=0.005, clip=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      trust_coefficient=trust_coefficient, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if p.ndim > 1:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
                    if group["clip"]:
                        ratio = torch.clamp(ratio / group["lr"], max=1.0)
                    # fresh or zero layers: plain SGD
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
                    d_p = (d_p + group["weight_decay"] * p) * ratio
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d_p.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                    buf = state["momentum_buffer"]
                    d_p = d_p + group["momentum"] * buf if group["nesterov"] else buf
                p.add_(d_p, alpha=-group["lr"])


# ----------------------------------------------------------------------------- loss


def total_coding_rate(z, eps=0.2):
    """Mean over patches p of R(Z_p) = 1/2 logdet(I_d + d / (m eps) Z_p^T Z_p), Z_p the (m, d) patch-p rows.

    Yu et al. 2020 (MCR2), https://arxiv.org/abs/2006.08558, eq. 2. By Sylvester's determinant identity
    logdet(I_d + c Z^T Z) = logdet(I_m + c Z Z^T), so the Gram matrix is built on the smaller side
    (m = 100 images vs d = 1024 dims: a 10x smaller matrix); one batched Cholesky over all patches.
    Under DDP the rows of all ranks are gathered (with autograd) so that m is the global batch.
    """
    with torch.autocast(z.device.type, enabled=False):
        # (patches, m, d)
        z = gather(F.normalize(z.float(), dim=-1)).transpose(0, 1)
        m, d = z.shape[1], z.shape[2]
        gram = z @ z.transpose(1, 2) if m <= d else z.transpose(1, 2) @ z
        eye = torch.eye(gram.shape[-1], device=z.device)
        # logdet of an SPD matrix = 2 sum log diag(L); cholesky_ex skips the error check, a host sync
        # (I + cG is always SPD)
        chol = torch.linalg.cholesky_ex(eye + d / (m * eps) * gram).L
        return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1).mean()


def patch_similarity(z):
    """Mean cosine similarity of every patch embedding to its image's patch centroid, z (batch, patches, dim)."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=-1)
        return F.cosine_similarity(z, z.mean(1, keepdim=True), dim=-1).mean()


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
def bag_of_features(model, images, gen, mean, std, size, patches, aug, autocast, progress=True, views_per_chunk=8192):
    """(N, hidden_dim) mean embedding h of `patches` augmented patches of every image, in eval mode, chunked."""
    was_training = model.training
    model.eval()
    chunk, out = max(1, views_per_chunk // patches), []
    bar = tqdm(range(0, len(images), chunk), desc=f"bag of features ({patches} patches)", leave=False, mininterval=1,
               disable=not progress)
    for i in bar:
        x = augment(images[i:i + chunk].repeat_interleave(patches, 0), gen, mean, std, size, **aug)
        with autocast:
            # the projector is not needed here
            h = model.pre_feature(model.backbone(x))
        out.append(h.float().view(-1, patches, h.shape[-1]).mean(1))
    model.train(was_training)
    return torch.cat(out)


def gather_rows(x, n):
    """Under DDP each rank holds rows rank::world of an n-row result: all n rows, in order, on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    world = dist.get_world_size()
    # equal sizes for all_gather
    x = F.pad(x, (0, 0, 0, -(-n // world) - len(x)))
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    # row j of rank r is row j * world + r
    return torch.stack(parts, 1).flatten(0, 1)[:n]


def evaluate(cfg, model, data, mean, std, aug, autocast, epoch, rank, world):
    """kNN top-1 / top-5 (%) of bag-of-features embeddings, which rank 0 also writes to <output-dir>/embeddings/.

    Every rank embeds its share of the images (rows rank::world) and rank 0 gathers them all; the others get Nones.
    """
    xtr, ytr, xte, yte, classes = data
    # the same patches at every evaluation
    gen = torch.Generator(xtr.device).manual_seed(cfg.seed * 100003 + rank)
    embed = lambda x: bag_of_features(model, x[rank::world], gen, mean, std, cfg.image_size, cfg.valid_patches, aug,
                                      autocast, progress=rank == 0)
    ftr, fte = gather_rows(embed(xtr), len(xtr)), gather_rows(embed(xte), len(xte))
    if rank:
        return None, None
    os.makedirs(os.path.join(cfg.output_dir, "embeddings"), exist_ok=True)
    for name, f, y in (("train", ftr, ytr), ("test", fte, yte)):
        # float16 halves the file (CIFAR-10's train set: 400 MB); embeddings beyond its range stay float32
        f = f.half() if f.abs().max() < torch.finfo(torch.float16).max else f
        atomic_save({"embeddings": f.cpu(), "labels": y.cpu(), "dim": f.shape[1], "patches": cfg.valid_patches,
                     "classes": classes, "checkpoint": os.path.join(cfg.output_dir, "last.pt"), "epoch": epoch + 1,
                     "dataset": cfg.dataset}, os.path.join(cfg.output_dir, "embeddings", f"{name}.pt"))
    return knn_accuracy(ftr, ytr, fte, yte, cfg.num_neighbours, cfg.temperature, len(classes))


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def main(cfg):
    check_config(cfg)
    ddp, rank, world, device, precision, autocast = setup(cfg)
    master = rank == 0
    cfg.output_dir = cfg.output_dir or os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S"))
    if not cfg.resume:
        refuse_to_overwrite(cfg.output_dir)

    # data: each split once on the device as uint8
    with rank_zero_first(ddp, master):
        xtr, ytr, xte, yte, classes = load_dataset(cfg)
    # EMP-SSL normalises every dataset with 0.5 / 0.5; (255 x - 0.5) / 0.5 = (x - 0.5 / 255) / (0.5 / 255)
    mean = std = (0.5 / 255,) * 3 if cfg.unscaled_inputs else (0.5,) * 3
    if cfg.batch_size > len(xtr):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(xtr)} images)")
    xtr, ytr, xte, yte = xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)
    data = xtr, ytr, xte, yte, classes
    local_batch, views_per_image = cfg.batch_size // world, cfg.train_patches
    # the last partial batch is dropped
    steps_per_epoch = len(xtr) // cfg.batch_size
    total_steps = cfg.max_epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_duration * total_steps)
    aug = dict(AUGMENT, blur=pil_gaussian_blur if cfg.blur == "pil" else gaussian_blur, compile=cfg.compile)

    # model, optimizer, resume
    model = EMPSSLModel(cfg.hidden_dim, cfg.projection_dim).to(device).to(memory_format=torch.channels_last)
    optimizer = LARS(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, momentum=0.9,
                     nesterov=True, trust_coefficient=0.005)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = torch.Generator(device)
    hint = f"--hidden-dim {cfg.hidden_dim}, --projection-dim {cfg.projection_dim}?"
    ckpt = resume(cfg, model, optimizer, scaler, steps_per_epoch, master, hint)
    start_step, best, aug_states = 0, {"knn_top1": -1.0, "knn_top5": -1.0, "epoch": 0}, None
    if ckpt:
        start_step, best, aug_states = ckpt["step"], ckpt["best"], ckpt["aug_rng"]
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        write_run_info(cfg, world_size=world, device=str(device), precision_used=precision, num_train=len(xtr),
                       num_test=len(xte), num_classes=len(classes), steps_per_epoch=steps_per_epoch, mean=mean, std=std)

    def checkpoint(step):
        """The state after `step` steps, with every rank's augmentation RNG so that a mid-epoch resume is exact."""
        return {"script": SCRIPT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch, "best": best,
                "aug_rng": rng_states(gen, ddp, world), "config": dataclasses.asdict(cfg), "classes": classes,
                "mean": list(mean), "std": list(std)}

    control, t_start = RunControl(cfg.checkpoint_minutes, ddp, master, device), time.time()
    for epoch in range(start_step // steps_per_epoch, cfg.max_epochs):
        first = max(0, start_step - epoch * steps_per_epoch)
        perm = epoch_order(len(xtr), cfg.seed, epoch, device)
        seed_augmentation(gen, cfg.seed, epoch, rank, world, aug_states if first else None)
        loss_sum, t_epoch, stop = torch.zeros((), device=device), time.time(), False
        # the bar closes also when an error (a divergence) leaves the loop
        with tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", disable=not master,
                  mininterval=1, leave=False) as bar:
            for i in range(first, steps_per_epoch):
                step = epoch * steps_per_epoch + i
                lr = set_lr(optimizer, lr_at(step, total_steps, warmup_steps, cfg.learning_rate))
                idx = perm[i * cfg.batch_size + rank * local_batch:][:local_batch]
                views = augment(xtr[idx].repeat_interleave(views_per_image, 0), gen, mean, std, cfg.image_size, **aug)
                if step == 0 and master:
                    save_views(xtr[idx], views, mean, std, os.path.join(cfg.output_dir, "views.png"))
                with autocast:
                    z = model(views)[1].view(local_batch, views_per_image, -1)
                tcr, similarity = total_coding_rate(z, cfg.tcr_eps), patch_similarity(z)
                loss = -tcr - cfg.invariance_coefficient * similarity
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                bar.update()
                if control.syncs_at(step + 1, cfg.log_every):
                    stop, save = control.poll(step + 1, loss, raw_model)
                    views_s = (i + 1 - first) * cfg.batch_size * views_per_image / (time.time() - t_epoch)
                    bar.set_postfix(loss=f"{loss.item():.3f}", tcr=f"{tcr.item():.2f}", sim=f"{similarity.item():.3f}",
                                    lr=f"{lr:.2e}", views_s=f"{views_s:.0f}")
                    # a stop or a timed save at an epoch's last step is left to the epoch end below
                    if (stop or save) and i + 1 < steps_per_epoch:
                        control.save(checkpoint(step + 1), cfg.output_dir, "last.pt")
                    if stop:
                        break

        # end of epoch: kNN, metrics, checkpoints
        if i + 1 == steps_per_epoch:
            stop = control.poll(step + 1, loss, raw_model)[0] or stop
            seconds, steps, top1, top5 = elapsed(t_epoch, device), steps_per_epoch - first, None, None
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.max_epochs:
                top1, top5 = evaluate(cfg, raw_model, data, mean, std, aug, autocast, epoch, rank, world)
                if ddp:
                    dist.barrier()
            stats = {"epoch": epoch + 1, "step": step + 1, "loss": loss_sum.item() / steps, "lr": lr, "knn_top1": top1,
                     "knn_top5": top5, "epoch_seconds": round(seconds, 3),
                     "views_per_second": round(steps * cfg.batch_size * views_per_image / seconds, 1)}
            improved = master and top1 is not None and top1 > best["knn_top1"]
            if improved:
                best = {"knn_top1": top1, "knn_top5": top5, "epoch": epoch + 1}
            control.save(checkpoint(step + 1), cfg.output_dir, *(["best.pt"] if improved else []), "last.pt")
            if master:
                append_metrics(cfg.output_dir, stats)
                knn = "knn -" if top1 is None else f"knn top1 {top1:.2f} top5 {top5:.2f}"
                print(f"epoch {epoch + 1}/{cfg.max_epochs} step {step + 1} loss {stats['loss']:.4f} lr {lr:.2e} {knn} "
                      f"{seconds:.1f}s {stats['views_per_second']:.0f} views/s", flush=True)
        if stop:
            control.interrupted(cfg.output_dir, step + 1)
    if master:
        print(f"done: best knn top1 {best['knn_top1']:.2f} top5 {best['knn_top5']:.2f} (epoch {best['epoch']}) "
              f"in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- plumbing


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, never a traceback."""


class Diverged(Exception):
    """Non-finite weights: one line on stderr, exit code 3; last.pt and best.pt keep the last finite state."""

    def __init__(self, step, loss):
        super().__init__(f"training diverged at step {step}: the loss is {loss:.4g} and the weights are no longer "
                         f"finite; last.pt and best.pt keep the last finite state. Try a lower --learning-rate, or "
                         f"--precision bf16 or fp32 if this ran in fp16")


def check_config(cfg):
    problems = [(cfg.train_patches < 2 or cfg.valid_patches < 1,
                 "--train-patches must be at least 2 and --valid-patches at least 1"),
                (cfg.hidden_dim < 1 or cfg.invariance_coefficient < 0 or cfg.tcr_eps <= 0,
                 "--hidden-dim and --tcr-eps must be positive, --invariance-coefficient >= 0"),
                (cfg.batch_size < 2, "--batch-size must be at least 2 (the coding rate is over the batch)"),
                (cfg.blur not in ("pil", "kernel3"), "--blur must be pil or kernel3"),
                (cfg.max_epochs < 1, "--max-epochs must be at least 1"),
                (cfg.learning_rate <= 0 or cfg.weight_decay < 0,
                 "--learning-rate must be positive, --weight-decay >= 0"),
                (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
                (cfg.projection_dim < 1, "--projection-dim must be positive"),
                (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
                (cfg.eval_every < 0 or cfg.log_every < 1, "--eval-every must be >= 0 and --log-every >= 1"),
                (cfg.image_size < 8, "--image-size must be at least 8"),
                (cfg.limit_train < 0 or cfg.limit_test < 0, "--limit-train and --limit-test must be >= 0"),
                (cfg.checkpoint_minutes < 0, "--checkpoint-minutes must be >= 0"),
                (cfg.device not in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
                (cfg.precision not in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
                (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda but no GPU is available")]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def parse_config(argv=None):
    """argparse generated from the dataclass: --batch-size for batch_size, help from the field."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(name, type=kind, default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
    return Config(**vars(parser.parse_args(argv)))


def setup(cfg):
    """(ddp, rank, world, device, precision, autocast). DDP when torchrun set RANK: one process per GPU (NCCL) or
    per CPU process (gloo); otherwise one process. Precision auto: bf16 where the GPU has it (compute capability 8+),
    fp16 with a GradScaler before, fp32 on the CPU."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        # rank 0 evaluates (and decodes a new ImageFolder) while the others wait: allow that more than 10 minutes
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    precision = cfg.precision
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        precision = "fp32" if device.type == "cpu" else "bf16" if bf16 else "fp16"
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    autocast = torch.autocast(device.type, dtype=ptdtype, enabled=precision != "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    return ddp, rank, world, device, precision, autocast


@contextmanager
def rank_zero_first(ddp, master):
    """Rank 0 runs the block first (a download, a decoding to cache), then the other ranks (which read the cache)."""
    if ddp and not master:
        dist.barrier()
    yield
    if ddp and master:
        dist.barrier()


def refuse_to_overwrite(output_dir):
    """Without --resume, a folder that already holds a run is an error, and nothing in it is touched."""
    found = [f for f in ("config.json", "metrics.jsonl", "last.pt", "best.pt")
             if os.path.exists(os.path.join(output_dir, f))]
    if found:
        raise UserError(f"--output-dir {output_dir} already holds a run ({', '.join(found)}): pass --resume auto to "
                        f"continue it, or choose another --output-dir")


def resume(cfg, model, optimizer, scaler, steps_per_epoch, master, hint):
    """Load --resume (auto: <output-dir>/last.pt if there is one) into model, optimizer and scaler: the checkpoint,
    or None for a fresh run.

    The command line, not the checkpoint, sets the recipe (a longer --max-epochs extends a run). metrics.jsonl keeps
    only the lines up to the checkpoint's step, so that a run resumed from an older checkpoint never repeats an epoch.
    """
    path = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if not path or (cfg.resume == "auto" and not os.path.exists(path)):
        return None
    ckpt = load_checkpoint(path, SCRIPT)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:
        problem = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise UserError(f"{path} does not fit this run ({hint}): {problem[:200]}")
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
    # fp16 both then and now
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if master:
        print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['step'] / steps_per_epoch:.2f})")
        metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= ckpt["step"]]
            with open(metrics + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics + ".tmp", metrics)
    return ckpt


def write_run_info(cfg, **derived):
    """config.json: every flag and what was derived from them (also printed)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    info = dict(dataclasses.asdict(cfg), **derived)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info))


def append_metrics(output_dir, stats):
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(stats) + "\n")


class RunControl:
    """What the loop decides at its host syncs, the log steps: stop after Ctrl-C / SIGTERM, save last.pt every
    --checkpoint-minutes, stop with exit code 3 once the weights are not finite. DDP ranks decide together."""

    def __init__(self, checkpoint_minutes, ddp, master, device):
        self.minutes, self.ddp, self.master, self.device = checkpoint_minutes, ddp, master, device
        self.signals, self.saved_at = [], time.time()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: self.signals.append(signum))

    def syncs_at(self, step, log_every):
        # one process stops at the step after a signal; DDP ranks can only agree at log steps
        return step % log_every == 0 or (bool(self.signals) and not self.ddp)

    def poll(self, step, loss, model):
        """(stop, save) at a sync step; Diverged if the weights are not finite (the sum of all weights is not)."""
        timed = self.master and self.minutes > 0 and time.time() - self.saved_at >= 60 * self.minutes
        weights = sum(p.detach().float().sum() for p in model.parameters())
        flags = torch.cat([torch.tensor([len(self.signals), timed], dtype=torch.float, device=self.device),
                           (~torch.isfinite(weights)).float().view(1)])
        if self.ddp:
            dist.all_reduce(flags)
        stop, save, diverged = (flags > 0).tolist()
        if diverged:
            raise Diverged(step, loss.item())
        return stop, save

    def save(self, ckpt, output_dir, *names):
        """Write ckpt as each of names (rank 0; every rank must build ckpt, a collective under DDP)."""
        if self.master:
            for name in names:
                atomic_save(ckpt, os.path.join(output_dir, name))
        self.saved_at = time.time()

    def interrupted(self, output_dir, step):
        if self.master:
            print(f"interrupted: saved {os.path.join(output_dir, 'last.pt')} at step {step}; continue with "
                  f"--resume auto --output-dir {output_dir}", file=sys.stderr)
        if self.ddp:
            dist.destroy_process_group()
        sys.exit(128 + (self.signals[0] if self.signals else signal.SIGTERM))


def epoch_order(n, seed, epoch, device):
    """The epoch's order of the training set: a pure function of (seed, epoch), so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def seed_augmentation(gen, seed, epoch, rank, world, saved=None):
    """The augmentation RNG at an epoch's start: a pure function of (seed, epoch, rank). A mid-epoch resume restores
    the state saved in the checkpoint instead, if it came from as many ranks on the same kind of device."""
    if saved is not None and len(saved) == world and saved[rank].numel() == gen.get_state().numel():
        gen.set_state(saved[rank])
    else:
        gen.manual_seed(seed * 100003 + epoch * 1009 + rank)


def rng_states(gen, ddp, world):
    """Every rank's generator state, for the checkpoint (a collective under DDP)."""
    states = [gen.get_state().cpu()]
    if ddp:
        states = [None] * world
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


def atomic_save(obj, path):
    """torch.save to a temp file, then os.replace: a kill during saving never leaves a corrupt file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        os.remove(cache)
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(files, desc=f"decoding {root}", unit="img", mininterval=1)):
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
            raise UserError(f"cannot read image {path}: {e}")
    labels = torch.tensor(labels, dtype=torch.long)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save({"images": images, "labels": labels, "classes": classes}, cache)
    return images, labels, classes


if __name__ == "__main__":
    cfg = parse_config()
    try:
        main(cfg)
    # OSError: an unwritable --output-dir or --data-dir, a full disk. Exit code 2: bad input; 3: training diverged.
    except (UserError, OSError, Diverged) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)
