"""Linear evaluation or full fine-tuning of an MMCR-pretrained CIFAR ResNet18.

Reads a last.pt / best.pt of mmcr_pretrain.py (or of a copy of it: the checkpoint records its backbone, dataset,
subset, image size and normalisation), writes the kNN accuracy of the loaded backbone, then trains a linear classifier
on top: with the backbone frozen (`linear`, the standard protocol) or with everything trained (`backbone+linear`). As
the reference, the classifier trains on the pretraining augmentation, and a frozen backbone re-estimates its BatchNorm
statistics.

    python mmcr_finetune.py --checkpoint runs/mmcr/<run>/best.pt                                    # linear probe
    python mmcr_finetune.py --checkpoint runs/mmcr/<run>/best.pt --finetune-type backbone+linear
    python mmcr_finetune.py --checkpoint runs/mmcr/<run>/best.pt --augment none --frozen-bn eval    # cached features
    python mmcr_finetune.py --checkpoint runs/my_mmcr/best.pt --model-from my_mmcr.py   # a copy with its own backbone
    torchrun --nproc_per_node 4 mmcr_finetune.py --checkpoint runs/mmcr/<run>/best.pt
A one-minute try on a CPU, after mmcr_pretrain.py's: a linear layer on cached features, 20 epochs
    python mmcr_finetune.py --checkpoint runs/try/mmcr/last.pt --augment none --frozen-bn eval --max-epochs 20 \\
        --batch-size 128 --output-dir runs/try/mmcr-finetune

Where to edit (a copy of this file is a complete program):
    the loss          F.cross_entropy in main()
    the views         train_views() in "augmentation" (ssl: augment_views(), the pretraining's ops, AUGMENT)
    the model         Classifier in "model", on the backbone that the checkpoint describes (build_backbone)
    the recipe        Config below: every field is a flag
    the loop          main(): data -> views -> model -> loss -> backward -> optimizer step, log steps, the epoch end
Everything below the "plumbing" line (flag checks, DDP, the run folder, checkpoint files) can stay unread.

Outputs in --output-dir: config.json, metrics.jsonl (epoch 0: the loaded backbone's kNN), last.pt (resumable),
best.pt (best test top-1).
Exit codes: 0 done, 2 bad input or an unwritable file (one line on stderr), 3 training diverged, 128 + signal after
Ctrl-C / SIGTERM.
"""
import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from knn import knn_accuracy

# the kind of checkpoint this script writes (a renamed copy keeps it, so mmcr_finetune.py reads its checkpoints too)
SCRIPT, RUNS = "mmcr_finetune", "runs/mmcr-finetune"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # the method: edit these
    checkpoint: str = arg("", "required for a new run: a last.pt / best.pt written by mmcr_pretrain.py (or a copy)")
    model_from: str = arg("", "the pretraining script (a copy of mmcr_pretrain.py) that defines the checkpoint's "
                          "backbone class, when it is not this file's ResNet18 (default: none; a checkpoint names "
                          "its class, but code is run only from a file given here)")
    dataset: str = arg("", "cifar10, cifar100, or an ImageFolder root (default: the checkpoint's dataset)")
    batch_size: int = arg(1024, "images per step over all GPUs (a smaller training set: all of it)")
    max_epochs: int = arg(50, "epochs of training")
    learning_rate: float = arg(0.01, "Adam peak learning rate of the classifier")
    weight_decay: float = arg(1e-6, "Adam (L2) weight decay")
    warmup_duration: float = arg(0.1, "fraction of all steps spent in linear warm-up before the cosine decay")
    finetune_type: str = arg("linear", "linear (frozen backbone) or backbone+linear (everything trains)")
    frozen_bn: str = arg("train", "linear: train (the reference: the frozen backbone's BatchNorm uses batch statistics "
                         "in training and re-estimates its running ones) or eval (they stay those of pretraining)")
    backbone_lr_scale: float = arg(0.1, "backbone learning rate = this x --learning-rate (backbone+linear only)")
    augment: str = arg("ssl", "ssl (the pretraining augmentation, as the reference), crop-flip (4-px padded crop + "
                       "flip) or none")
    num_neighbours: int = arg(200, "k of the kNN check of the loaded backbone")
    temperature: float = arg(0.5, "temperature of the kNN check of the loaded backbone")
    eval_every: int = arg(1, "test evaluation every this many epochs (0: only after the last, always done)")
    image_size: int = arg(0, "side of the square images (0: the checkpoint's)")
    limit_train: int = arg(-1, "use a random subset of this many training images (0 = all; -1: the pretraining's "
                           "subset on its dataset, else all)")
    limit_test: int = arg(-1, "use a random subset of this many test images (0 = all; -1: the pretraining's subset "
                          "on its dataset, else all)")
    # the run: where, how, how often
    data_dir: str = arg("", "where CIFAR is downloaded and decoded ImageFolders are cached (default: the "
                        "pretraining run's)")
    output_dir: str = arg("", "the run's folder (default: runs/mmcr-finetune/<date>-<time>); one with a run needs --resume")
    resume: str = arg("", "a checkpoint to continue, or 'auto': <output-dir>/last.pt if there is one (default: a new "
                      "run); the run keeps the checkpoint's recipe")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool = arg(False, "torch.compile the model and the augmentation")
    log_every: int = arg(50, "most steps between log steps, the loop's only host syncs (they also come every 2 s)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt at the first log step this many minutes after the last "
                                    "save (0: only at epoch ends)")
    seed: int = arg(42, "random seed, 0 to 2^32 - 1")


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


def load_image_folder(root, image_size, cache_dir):
    """Decode root/<class>/* once into uint8 (N, 3, S, S): RGB, the shorter side resized to S, centre-cropped. The
    result is cached in cache_dir, keyed by the file list, sizes and mtimes; a broken cache is decoded again."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    # like torchvision's ImageFolder: non-images are skipped, a class without images is an error
    files = [(os.path.join(d, n), label) for label, c in enumerate(classes)
             for d, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True))
             for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise UserError(f"no images found in {root} (expected {root}/<class>/<image>.jpg|png|...)")
    labels = [label for _, label in files]
    empty = [os.path.join(root, c) for i, c in enumerate(classes) if i not in set(labels)]
    if empty:
        raise UserError(f"no images in the class folders {empty[:5]}")
    listing = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f, _ in files]
    key = hashlib.sha1(repr((os.path.abspath(root), image_size, listing)).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"imagefolder-{key}.pt")
    try:
        d = torch.load(cache, weights_only=True)
        if d["images"].shape == (len(files), 3, image_size, image_size) and d["labels"].tolist() == labels:
            return d["images"], d["labels"], d["classes"]
        raise ValueError("it does not match the image folder")
    except (FileNotFoundError, NotADirectoryError):
        pass
    except Exception as e:
        print(f"warning: cannot use the cached decoded images {cache} ({type(e).__name__}: {str(e)[:100]}); "
              f"decoding again", file=sys.stderr)
    images, unreadable = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8), []
    for i, (path, _) in enumerate(tqdm(files, desc=f"decoding {root}", unit="img", mininterval=1, leave=False)):
        try:
            with Image.open(path) as im:
                # grayscale, palette and RGBA all occur in the wild
                im = im.convert("RGB")
                # the shorter side to image_size, then the centre crop
                s = image_size / min(im.size)
                w, h = max(image_size, round(im.size[0] * s)), max(image_size, round(im.size[1] * s))
                left, top = (w - image_size) // 2, (h - image_size) // 2
                im = im.resize((w, h), Image.BICUBIC).crop((left, top, left + image_size, top + image_size))
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                images[i] = pixels.view(image_size, image_size, 3).permute(2, 0, 1)
        except Exception as e:
            unreadable.append(f"{path} ({e})")
    if unreadable:
        more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        raise UserError(f"cannot read {len(unreadable)} images: {'; '.join(unreadable[:10])}{more}")
    labels = torch.tensor(labels)
    # the cache is optional: a full or read-only --data-dir costs a decoding next time, not this run
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_open(cache) as f:
            torch.save({"images": images, "labels": labels, "classes": classes}, f)
    except (OSError, UserError) as e:
        print(f"warning: cannot cache the decoded images in {cache_dir} ({e}); the next run decodes again",
              file=sys.stderr)
    return images, labels, classes


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


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """torch.compile(fn), made once per function; a run's shapes are fixed, so no dynamic shapes."""
    return torch.compile(fn, dynamic=False)


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
    x = where(draws.coin(aug["p_solarize"]), solarize(x, aug["solarize_threshold"] / 255), x)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


# The reference's transforms run on PIL images, so RandomSolarize(0.5) compares uint8 values 0..255 with 0.5 and
# inverts every pixel >= 1 (solarize_threshold is in levels of 255). RandomGrayscale() without p is torchvision's p 0.1.
AUGMENT = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.1,
               p_blur=0.1, blur=gaussian_blur, p_solarize=0.2, solarize_threshold=1)


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


def train_views(images, gen, aug, kind):
    """uint8 images (N, 3, S, S) -> normalised float views for training the classifier. `ssl`: the pretraining
    augmentation (as the reference), `crop-flip`: a random S x S crop of the image zero-padded by 4 px + flip (the
    supervised CIFAR recipe), `none`: the images as they are."""
    if kind == "ssl":
        return augment(images, gen, aug)
    n = images.shape[0]
    size = images.shape[-1]
    x = images.float().div_(255)
    if kind == "crop-flip":
        # integer shifts at scale 1 make grid_sample copy pixels exactly
        x = F.pad(x, (4, 4, 4, 4))
        top = torch.randint(0, 9, (n,), device=x.device, generator=gen).float()
        left = torch.randint(0, 9, (n,), device=x.device, generator=gen).float()
        side = torch.full((n,), float(size), device=x.device)
        x = resized_crop_flip(x, top, left, side, side, torch.rand(n, device=x.device, generator=gen) < 0.5, size)
    return normalize(x, aug["norm"])


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
    no classifier. `width` channels in the first stage, 8 x width features (64: the standard ResNet18, 512-d);
    `blocks` per stage (2, 2, 2, 2: ResNet18; 3, 4, 6, 3: ResNet34's shape)."""

    def __init__(self, width=64, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.width, self.blocks, self.feature_dim = width, list(blocks), 8 * width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = [width, width, 2 * width, 4 * width, 8 * width]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.Sequential(BasicBlock(channels[i], channels[i + 1], 1 if i == 0 else 2),
                          *[BasicBlock(channels[i + 1], channels[i + 1], 1) for _ in range(n - 1)])
            for i, n in enumerate(blocks))
        # torchvision's initialisation; the stem keeps PyTorch's default, as in the reference code, which replaces
        # torchvision's 7x7 stem after building the network
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.conv1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build_backbone(architecture, model_from):
    """The pretraining's backbone, untrained: this file's ResNet18 of the recorded width and blocks, or the class that
    the checkpoint names, Class(width), from the pretraining script that --model-from gives. A checkpoint is data:
    loading one never runs code that it names."""
    name, width, blocks = architecture["backbone"], architecture["width"], architecture["blocks"]
    if not model_from and name == "ResNet18":
        return ResNet18(width, blocks)
    if not model_from:
        raise UserError(f"the checkpoint's backbone is a {name}, a class defined in {architecture['file']}: pass "
                        f"--model-from {shlex.quote(architecture['file'])} to build it from that file")
    sys.path.insert(0, os.path.dirname(model_from))
    try:
        spec = importlib.util.spec_from_file_location("pretraining_script", model_from)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--model-from {model_from} cannot be imported ({type(e).__name__}: {e})") from None
    if not isinstance(getattr(module, name, None), type):
        raise UserError(f"--model-from {model_from} defines no class {name}, the checkpoint's backbone")
    return getattr(module, name)(width, blocks) if blocks else getattr(module, name)(width)


class Classifier(nn.Module):
    """The pretrained backbone and a linear layer; a frozen backbone runs without autograd."""

    def __init__(self, backbone, num_classes, frozen, frozen_bn="train"):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(backbone.feature_dim, num_classes)
        self.frozen, self.frozen_eval = frozen, frozen and frozen_bn == "eval"
        self.backbone.requires_grad_(not frozen)
        # with --frozen-bn eval, puts a frozen backbone in eval mode from the start
        self.train()

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            f = self.backbone(x)
        return self.fc(f)

    def train(self, mode=True):
        # --frozen-bn eval: a frozen backbone stays in eval mode and its BatchNorm statistics never move. train (the
        # reference's requires_grad=False alone): it normalises with batch statistics while the classifier trains and
        # re-estimates its running statistics on the training views, which the test pass then uses.
        super().train(mode)
        self.backbone.train(mode and not self.frozen_eval)
        return self


def load_pretrained(cfg):
    """The checkpoint of --checkpoint (written by mmcr_pretrain.py or a copy of it) and cfg with the flags left unset
    from its run: the dataset, its subset (on the same dataset), the data folder and the image size."""
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (a last.pt / best.pt of mmcr_pretrain.py)")
    pretrained = load_checkpoint(cfg.checkpoint, "mmcr_pretrain")
    run = pretrained["config"]
    dataset, image_size = cfg.dataset or run["dataset"], cfg.image_size or run["image_size"]
    if image_size != run["image_size"]:
        raise UserError(f"--image-size {image_size} differs from the checkpoint's {run['image_size']}")
    limits = {k: run[k] if dataset == run["dataset"] else 0 for k in ("limit_train", "limit_test")
              if getattr(cfg, k) < 0}
    return pretrained, dataclasses.replace(cfg, dataset=dataset, image_size=image_size,
                                           data_dir=cfg.data_dir or run["data_dir"], **limits)


class Gather(torch.autograd.Function):
    """all_gather along dim 0, whose backward sums every rank's gradient and returns this rank's slice: every rank
    computes the same global loss from the gathered tensor, so the sum is world_size x the one-process gradient, which
    DDP's average over the ranks cancels."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # (a transposed use sends a strided gradient)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def extract_features(backbone, images, norm, split):
    """Backbone features of uint8 images (no augmentation), in chunks, in eval mode, with a progress bar."""
    was_training = backbone.training
    backbone.eval()
    features = []
    with tqdm(total=len(images), desc=f"backbone features of the {split} images", unit="img", leave=False) as bar:
        # chunks that a CPU computes in a second or so, so that the bar moves
        for chunk in images.split(1024 if images.is_cuda else 64):
            features.append(backbone(normalize(chunk, norm)).float())
            bar.update(len(chunk))
    backbone.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def classify(head, inputs, labels, norm=None):
    """{top1, top5 (%), test_loss} of head on the test set: the classifier on uint8 images (normalised with norm), or
    its linear layer on cached features."""
    was_training = head.training
    head.eval()
    # summed loss, top-1 hits, top-5 hits: one host sync at the end; chunks that a CPU computes in a second or so
    sums, size = torch.zeros(3, device=labels.device), 1024 if inputs.is_cuda or norm is None else 64
    for i in tqdm(range(0, len(inputs), size), desc="the classifier on the test images", leave=False):
        logits = head(inputs[i:i + size] if norm is None else normalize(inputs[i:i + size], norm)).float()
        y = labels[i:i + size]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")])
    head.train(was_training)
    top1, top5, loss = (sums / len(inputs)).tolist()
    return {"top1": 100 * top1, "top5": 100 * top5, "test_loss": loss}


@torch.no_grad()
def backbone_features(backbone, data, aug, ctx):
    """The backbone's features of both splits' plain images, as Data."""
    with ctx.autocast:
        return Data(extract_features(backbone, data.train_x, aug["norm"], "train"), data.train_y,
                    extract_features(backbone, data.test_x, aug["norm"], "test"), data.test_y, data.classes)


def knn(cfg, features, ctx):
    """{knn_top1, knn_top5} (%) of the features, on rank 0 ({} on the others)."""
    if not ctx.master:
        return {}
    top1, top5 = knn_accuracy(features.train_x, features.train_y, features.test_x, features.test_y,
                              cfg.num_neighbours, cfg.temperature, len(features.classes))
    return {"knn_top1": top1, "knn_top5": top5}


def evaluate(model, data, features, aug, ctx):
    """The classifier's {top1, top5, test_loss} on the test set (its linear layer on cached features), on rank 0 ({}
    on the others)."""
    if not ctx.master:
        return {}
    with ctx.autocast:
        if features is not None:
            return classify(model.fc, features.test_x, data.test_y)
        return classify(model, data.test_x, data.test_y, aug["norm"])


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


def epoch_order(n, seed, epoch, device):
    """The epoch's order of the training set, and below each step's random stream: pure functions of the seed and the
    epoch or step (and rank), so that a resumed run sees the same data and views without saving a random state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)


def step_seed(seed, step, rank):
    return (seed * 100003 + step) * 1024 + rank


def main(cfg, given=frozenset()):
    # the run: a resume continues its checkpoint's recipe and holds the backbone; a new run loads the pretraining
    # checkpoint, whose run fills in the data flags left unset; this process's device and DDP rank; the run folder
    cfg = check_config(cfg)
    cfg, ckpt, changed = load_resume(cfg, given)
    ctx = setup(cfg)
    cfg.output_dir, lock = claim_output_dir(cfg, ckpt, ctx)
    pretrained, cfg = (None, cfg) if ckpt else load_pretrained(cfg)

    # data: each split once on the device as uint8, normalised as in pretraining
    with rank_zero_first(ctx):
        data = load_dataset(cfg).to(ctx.device)
    source = ckpt or pretrained
    if len(data.classes) != len(source["classes"]):
        raise UserError(f"{cfg.checkpoint} was pretrained on a dataset with {len(source['classes'])} classes, but "
                        f"--dataset {cfg.dataset} has {len(data.classes)}")
    cfg.batch_size = fit_batch_size(cfg, given, len(data.train_x), ctx)
    aug = dict(AUGMENT, size=cfg.image_size, norm=source["norm"], compile=cfg.compile)
    # the last partial batch is dropped
    steps_per_epoch = len(data.train_x) // cfg.batch_size
    total_steps = cfg.max_epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_duration * total_steps)

    # model: the pretrained backbone and a linear layer; optimizer; a resume loads their states
    frozen = cfg.finetune_type == "linear"
    model = Classifier(build_backbone(source["architecture"], cfg.model_from), len(data.classes), frozen, cfg.frozen_bn)
    if pretrained:
        backbone = {k[len("backbone."):]: v for k, v in pretrained["model"].items() if k.startswith("backbone.")}
        load_fitting(model.backbone, backbone, f"{cfg.checkpoint}: its backbone", "; if a changed copy of "
                     "mmcr_pretrain.py wrote it, --model-from that file builds the backbone it defines")
    model = model.to(ctx.device, memory_format=torch.channels_last)
    groups = [{"params": model.fc.parameters(), "lr_scale": 1.0}]
    if not frozen:
        groups.append({"params": model.backbone.parameters(), "lr_scale": cfg.backbone_lr_scale})
    # fused: one kernel, and no host sync under fp16
    optimizer = torch.optim.Adam(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 fused=ctx.device.type == "cuda")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
    step, best, run_id = load_states(ckpt, model=model, optimizer=optimizer, scaler=scaler)
    # A frozen backbone in eval mode without augmentation always gives the same features: the linear layer then
    # trains on these, cached, and a step runs the linear layer alone.
    cached = frozen and cfg.augment == "none" and cfg.frozen_bn == "eval"
    net = wrap(model.fc if cached else model, cfg, ctx)
    gen, running = torch.Generator(ctx.device), torch.zeros(1, device=ctx.device)

    def state():
        """What last.pt (and best.pt) hold: all that a resume needs, the backbone too."""
        return dict(script=SCRIPT, run_id=run_id, config=dataclasses.asdict(cfg), step=step, best=best,
                    running=running.cpu(), model=model.state_dict(), architecture=source["architecture"],
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), classes=data.classes,
                    norm=aug["norm"])

    # config.json; from here Ctrl-C or SIGTERM stops the run at the next log step, once last.pt is saved
    write_config(cfg, ctx, ckpt, run_id, changed, num_train=len(data.train_x), num_test=len(data.test_x),
                 num_classes=len(data.classes), steps_per_epoch=steps_per_epoch, norm=aug["norm"])
    catch_signals()
    # the backbone's features of the plain images: the linear layer's input when cached; on a new run, their kNN first
    # (a wrong checkpoint shows at once), epoch 0 of metrics.jsonl, and a stop during it saves last.pt at step 0
    features = backbone_features(model.backbone, data, aug, ctx) if cached or not ckpt else None
    if not ckpt:
        write_metrics(cfg, ctx, dict(epoch=0, step=0, **knn(cfg, features, ctx)))
        if agree(ctx, bool(SIGNALS))[0]:
            save_checkpoint(cfg, ctx, state())
            raise stopped(cfg, ctx, step)
    t_start = saved_at = time.time()
    next_log = step + 1
    for epoch in range(step // steps_per_epoch, cfg.max_epochs):
        order = epoch_order(len(data.train_x), cfg.seed, epoch, ctx.device)
        # the sum of the epoch's losses (a resume inside the epoch continues the checkpoint's)
        inside = ckpt and step == ckpt["step"] and step % steps_per_epoch
        running = ckpt["running"].to(ctx.device) if inside else torch.zeros(1, device=ctx.device)
        first, t_epoch = step, time.time()
        with tqdm(total=steps_per_epoch, initial=step % steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.max_epochs}",
                  unit="step", disable=not ctx.master, leave=False) as bar:
            while step < (epoch + 1) * steps_per_epoch:
                lr = lr_at(step, total_steps, warmup_steps, cfg.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                idx = batch(order, step % steps_per_epoch, cfg.batch_size, ctx)
                gen.manual_seed(step_seed(cfg.seed, step, ctx.rank))
                inputs = features.train_x[idx] if cached else train_views(data.train_x[idx], gen, aug, cfg.augment)
                with ctx.autocast:
                    logits = net(inputs)
                loss = F.cross_entropy(logits.float(), data.train_y[idx])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                step += 1
                bar.update()
                if step == next_log or step % steps_per_epoch == 0:
                    # a log step (every 2 s, at most --log-every steps apart, and at the epoch's end): the loop's one
                    # GPU sync, where the ranks agree on a stop, a timed save and divergence
                    means = running / (step - epoch * steps_per_epoch)
                    shown = dict(loss=means.item(), lr=lr)
                    stop, timed, next_log = log_step(bar, cfg, ctx, model, step, shown, saved_at)
                    # (at the epoch's end, its evaluation and files come first)
                    if (stop or timed) and step % steps_per_epoch:
                        saved_at = save_checkpoint(cfg, ctx, state())
                    if stop and step % steps_per_epoch:
                        raise stopped(cfg, ctx, step)
        # the epoch's end: the test set (every --eval-every epochs, and after the last), metrics.jsonl, checkpoints
        seconds = time.time() - t_epoch
        due = (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or epoch + 1 == cfg.max_epochs
        scores = evaluate(model, data, features if cached else None, aug, ctx) if due else {}
        improved = scores.get("top1", -1) > best.get("top1", -1)
        best = dict(scores, epoch=epoch + 1) if improved else best
        write_metrics(cfg, ctx, dict(epoch=epoch + 1, step=step, loss=running.item() / steps_per_epoch, lr=lr, **scores,
                                     epoch_seconds=round(seconds, 3), images_per_second=round(
                                         (step - first) * cfg.batch_size / seconds)))
        saved_at = save_checkpoint(cfg, ctx, state(), best=improved)
        # a stop asked for during the evaluation ends the run here, with its files written
        if agree(ctx, bool(SIGNALS))[0]:
            raise stopped(cfg, ctx, step)
    if ctx.master:
        print(f"done: best {in_words(best)} in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")


# ----------------------------------------------------------------------------- plumbing
# A hacker need not read further: flag checks and errors, DDP, the run folder, checkpoint files, log steps and stops.


class UserError(Exception):
    """Bad input or a file that cannot be written: one line on stderr, exit code 2, never a traceback."""


class Diverged(Exception):
    """Non-finite weights: one line on stderr, exit code 3."""


class Stopped(BaseException):
    """Stopped(signal, message) after Ctrl-C or SIGTERM: exit code 128 + the signal. A BaseException, as
    KeyboardInterrupt, so that no `except Exception` on its way takes it for an error."""


def check_config(cfg):
    """The first impossible flag value is a UserError; returns cfg with absolute paths (so that a resume finds them
    from any directory)."""
    for bad, message in [
            # first what every script checks: a NaN would pass every comparison unnoticed
            *[(isinstance(v, float) and not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number")
              for k, v in dataclasses.asdict(cfg).items()],
            (cfg.finetune_type not in ("linear", "backbone+linear"),
             "--finetune-type must be linear or backbone+linear"),
            (cfg.augment not in ("ssl", "crop-flip", "none"), "--augment must be ssl, crop-flip or none"),
            (cfg.frozen_bn not in ("train", "eval"), "--frozen-bn must be train or eval"),
            (cfg.backbone_lr_scale < 0 or cfg.weight_decay < 0, "--backbone-lr-scale and --weight-decay must be >= 0"),
            (cfg.batch_size < 1 or cfg.max_epochs < 1, "--batch-size and --max-epochs must be positive"),
            (cfg.learning_rate <= 0, "--learning-rate must be positive"),
            (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
            (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
            (cfg.eval_every < 0 or 0 < cfg.image_size < 8, "--eval-every must be >= 0, --image-size 0 or at least 8"),
            (cfg.limit_train < -1 or cfg.limit_test < -1, "--limit-train and --limit-test must be >= -1"),
            (cfg.resume == "auto" and not cfg.output_dir, "--resume auto needs --output-dir, the folder of the run"),
            (cfg.log_every < 1 or cfg.checkpoint_minutes < 0, "--log-every must be >= 1, --checkpoint-minutes >= 0"),
            (not 0 <= cfg.seed < 2 ** 32, "--seed must be in 0 .. 2^32 - 1"),
            (cfg.device not in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
            (cfg.precision not in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
            (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda, but no GPU is available")]:
        if bad:
            raise UserError(message)
    absolute = {k: os.path.abspath(getattr(cfg, k)) for k in ("checkpoint", "model_from", "data_dir", "dataset")
                if getattr(cfg, k) not in ("", "cifar10", "cifar100")}
    return dataclasses.replace(cfg, **absolute)


def parse_config(argv=None):
    """argparse generated from Config (--batch-size for batch_size; the help, and the default as config.json writes
    it): the Config and the names of the flags that the command line gave."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        # an empty default is explained by the help itself
        shown = f.metadata["help"] + (f" (default: {json.dumps(f.default)})" if f.default != "" else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument("--" + f.name.replace("_", "-"), help=shown.replace("%", "%%"), **kind)
    given = vars(parser.parse_args(argv))
    return Config(**given), frozenset(given)


def setup(cfg):
    """This process's device, precision (`with ctx.autocast:`) and place in a torchrun job: DDP when torchrun set RANK,
    one process per GPU (NCCL) or per CPU process (gloo). Precision auto: bf16 where the GPU has it (compute
    capability 8+), fp16 with a GradScaler before, fp32 on a CPU."""
    cuda, ddp = cfg.device != "cpu" and torch.cuda.is_available(), "RANK" in os.environ
    if ddp:
        # rank 0 evaluates (and decodes a new ImageFolder) while the others wait: allow that more than 10 minutes
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = cfg.precision if cfg.precision != "auto" else "fp32" if not cuda else (
        "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    rank, dtype = dist.get_rank() if ddp else 0, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return SimpleNamespace(device=device, precision=precision, rank=rank, world=dist.get_world_size() if ddp else 1,
                           ddp=ddp, master=rank == 0, autocast=torch.autocast(device.type, dtype, enabled=bool(dtype)))


@contextlib.contextmanager
def rank_zero_first(ctx):
    """Rank 0 runs the block first (a download, a decoding to cache), then the other ranks (which read the cache)."""
    if ctx.ddp and not ctx.master:
        dist.barrier()
    yield
    if ctx.ddp and ctx.master:
        dist.barrier()


def fit_batch_size(cfg, given, n, ctx):
    """--batch-size for n training images: a default larger than n shrinks to what fits (with a note), a given one is
    an error; it must divide among the processes."""
    batch_size = cfg.batch_size if cfg.batch_size <= n else n - n % ctx.world
    if batch_size < cfg.batch_size and "batch_size" in given:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({n} images)")
    if batch_size < cfg.batch_size and ctx.master:
        print(f"note: --batch-size {batch_size}, the size of the training set (the default is larger)")
    if batch_size % ctx.world or batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {ctx.world} processes")
    return batch_size


def wrap(model, cfg, ctx):
    """What the loop calls: the model, compiled with --compile, in DDP under torchrun (checkpoints save the model)."""
    model = torch.compile(model) if cfg.compile else model
    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.ddp else model


# Flags that a resume may change: they do not change what the run computes. Every other flag comes from the checkpoint.
RESUME_MAY_CHANGE = {"max_epochs", "eval_every", "log_every", "checkpoint_minutes", "device", "precision", "compile",
                     "data_dir", "output_dir", "resume"}


def load_resume(cfg, given):
    """The checkpoint of --resume ('auto': <output-dir>/last.pt, if there is one; its path as "file"), and the run's
    recipe: every flag comes from its config but those of RESUME_MAY_CHANGE that the command line gives; another value
    for any other flag is a UserError that lists them. Returns (cfg, checkpoint, {flag: [the run's, the new]})."""
    path = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if not path or (cfg.resume == "auto" and not os.path.exists(path)):
        return cfg, None, {}
    ckpt = dict(load_checkpoint(path, SCRIPT), file=os.path.abspath(path))
    saved = {k: v for k, v in ckpt["config"].items() if hasattr(cfg, k) and k not in ("resume", "output_dir")}
    differ = sorted(n for n in given if n not in RESUME_MAY_CHANGE and n in saved and saved[n] != getattr(cfg, n))
    if differ:
        listed = ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)} (the run's: {saved[n]})" for n in differ)
        raise UserError(f"{path} continues its run's recipe, and the command line changes it: {listed}; leave these "
                        f"flags out to continue the run, or start a new run in another --output-dir")
    changed = {n: [saved[n], getattr(cfg, n)] for n in sorted(given) if n in saved and saved[n] != getattr(cfg, n)}
    return dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in given}), ckpt, changed


def load_states(ckpt, **objects):
    """A resume: the checkpoint's states into the objects (model=..., optimizer=...). Returns its (step, best scores,
    run id), or those of a new run."""
    for name, obj in objects.items() if ckpt else ():
        # a GradScaler's state carries over only from fp16 to fp16
        if not isinstance(obj, torch.amp.GradScaler) or (obj.is_enabled() and ckpt[name]):
            load_fitting(obj, ckpt[name], f"{ckpt['file']}: its {name}")
    return (ckpt["step"], ckpt["best"], ckpt["run_id"]) if ckpt else (0, {}, os.urandom(6).hex())


def load_fitting(obj, state, what, advice=""):
    """obj.load_state_dict(state); a module's state with other keys or shapes is one UserError that says which."""
    own = obj.state_dict() if isinstance(obj, nn.Module) else {}
    wrong = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if own and k not in own],
             "of another shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
    try:
        if any(wrong.values()):
            raise ValueError("; ".join(f"{len(v)} {kind}: {', '.join(v[:3])}{', ...' * (len(v) > 3)}"
                                       for kind, v in wrong.items() if v))
        obj.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{what} does not fit ({str(e).splitlines()[0]}){advice}") from None


CREATED = []  # the run folder (or lock file) that this process made: exit 2 before its first checkpoint removes it


def claim_output_dir(cfg, ckpt, ctx):
    """--output-dir (else a resume's own folder, else runs/<method>/<date>-<time>), created and locked by rank 0 while
    this process lives (fcntl.flock on .lock: the kernel releases it when the process ends in any way). Refused,
    changing nothing: a folder that another process holds, one that holds a run (a checkpoint) when this is no
    resume of it. (Under torchrun a failure on rank 0 ends the other ranks.) Returns (the folder, the lock)."""
    folder = [cfg.output_dir or (os.path.dirname(ckpt["file"]) if ckpt else
                                 os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S")))]
    if ctx.ddp:
        dist.broadcast_object_list(folder, src=0)
    if not ctx.master:
        return folder[0], None
    # what this process makes: the folder's first missing parent, or else the lock file
    folder, made = folder[0], os.path.join(folder[0], ".lock")
    while not os.path.exists(made) and not os.path.exists(os.path.dirname(os.path.abspath(made))):
        made = os.path.dirname(os.path.abspath(made))
    CREATED[:] = [] if os.path.exists(made) else [made]
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
        lock.seek(0)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"--output-dir {folder} is in use by another run (PID {lock.read().strip()}); wait for it to "
                        f"end, or choose another --output-dir") from None
    except OSError as e:
        raise UserError(f"cannot write {e.filename or folder} ({e.strerror})") from None
    held, other = [f for f in ("last.pt", "best.pt") if os.path.exists(os.path.join(folder, f))], None
    with contextlib.suppress(OSError, ValueError, AttributeError), open(os.path.join(folder, "config.json")) as f:
        other = json.load(f).get("run_id")
    if held and (not ckpt or other not in (None, ckpt["run_id"])):
        raise UserError(f"--output-dir {folder} already holds a run ({', '.join(held)}): " + (
            f"another one than {ckpt['file']}; resume into that run's own folder, or into an empty one" if ckpt else
            "pass --resume auto to continue it, or choose another --output-dir"))
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError as e:
        raise UserError(f"cannot write {lock.name} ({e.strerror}: is the disk full or read-only?)") from None
    return folder, lock


def write_config(cfg, ctx, ckpt, run_id, changed, **info):
    """config.json: the run id, every flag and what was derived from them (info), also printed. A resume keeps the
    run's config.json, appends a record of itself and cuts metrics.jsonl back to the checkpoint's step."""
    path, now = os.path.join(cfg.output_dir, "config.json"), time.strftime("%Y-%m-%dT%H:%M:%S")
    derived = dict(world_size=ctx.world, device=str(ctx.device), precision_used=ctx.precision, **info)
    run, lines = {"run_id": run_id, "started": now, **dataclasses.asdict(cfg), **derived}, []
    if ckpt:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            run = json.load(f)
        run.setdefault("resumes", []).append({"at": now, "from": ckpt["file"], "step": ckpt["step"], "changed": changed,
                                              "world_size": ctx.world, "precision_used": ctx.precision})
        print(f"resumed from {ckpt['file']} at step {ckpt['step']}" + (f", changing {changed}" if changed else ""))
        with contextlib.suppress(FileNotFoundError), open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
            for line in f:
                # (a line cut off by a crash or a full disk is left out)
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    lines += [line] if json.loads(line)["step"] <= ckpt["step"] else []
    if ctx.master:
        with atomic_open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as f:
            f.writelines(lines)
        with atomic_open(path, "w") as f:
            json.dump(run, f, indent=2)
        print(json.dumps(dict(dataclasses.asdict(cfg), **derived)))


SIGNALS = []  # the stop requests received (Ctrl-C, SIGTERM); log steps read it
LOG_SECONDS = 2  # the time between log steps, at most


def quit_at_once(signum, frame):
    """Ctrl-C or SIGTERM before the run starts (cli() sets this handler), or a second one after."""
    raise Stopped(signum, "interrupted again: quit at once, keeping the last save" if SIGNALS else
                  "interrupted before the run started: nothing to continue")


def catch_signals():
    """From here the first Ctrl-C or SIGTERM stops the run at the next log step (or after the evaluation that runs),
    once last.pt is saved; a second one quits at once."""
    def on_signal(signum, frame):
        if SIGNALS:
            quit_at_once(signum, frame)
        SIGNALS.append(signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)


def log_step(bar, cfg, ctx, model, step, shown, saved_at):
    """The loop's one GPU sync: the epoch's running means and the lr on the bar, and what every rank decides together:
    a stop (Ctrl-C or SIGTERM on any rank), a timed save (rank 0's clock) and the next log step (LOG_SECONDS on at rank
    0's pace, at most --log-every steps on). Weights that are no longer finite raise Diverged."""
    rate = (bar.format_dict["rate"] or 0) if ctx.master else 0
    weights = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum()
    timed = ctx.master and 0 < cfg.checkpoint_minutes <= (time.time() - saved_at) / 60
    stop, timed, bad, interval = agree(ctx, bool(SIGNALS), timed, ~weights.isfinite(),
                                       ctx.master * min(cfg.log_every, max(1, int(LOG_SECONDS * rate))))
    shown = {k: float(v) for k, v in shown.items()}
    if bad:
        files = [f for f in ("last.pt", "best.pt") if os.path.exists(os.path.join(cfg.output_dir, f))]
        raise Diverged(f"training diverged at step {step}: the weights are no longer finite (mean loss "
                       f"{shown['loss']:.4g}); " + (f"{' and '.join(files)} in {cfg.output_dir} keep the last finite "
                       f"state" if files else "nothing was saved, so the folder can take a new run") + ". Try a lower "
                       "--learning-rate in a new --output-dir, or --precision bf16 or fp32 after fp16 (a resume may)")
    bar.set_postfix_str(in_words(shown))
    return bool(stop), bool(timed), step + int(interval)


def agree(ctx, *flags):
    """Host or device flags as floats, each maxed over the ranks under DDP (so every rank takes the same decisions)."""
    flags = torch.stack([torch.as_tensor(f, dtype=torch.float64, device=ctx.device) for f in flags])
    if ctx.ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def in_words(values):
    """'mean loss -4.123 lr 0.001 knn_top1 57.19': values for a log line (epoch means say so)."""
    return " ".join(f"{'mean ' * (k in ('loss', 'tcr', 'sim'))}{k} {f'{v:.4g}' if isinstance(v, float) else v}"
                    for k, v in values.items())


def write_metrics(cfg, ctx, line):
    """The epoch's line, appended to metrics.jsonl (a line cut off by a crash is left out when read) and printed."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    try:
        if ctx.master:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"epoch {line['epoch']}/{cfg.max_epochs} {in_words({**line, 'epoch': ''})[7:]}", flush=True)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}: is the disk full or read-only?)") from None


def save_checkpoint(cfg, ctx, state, best=False):
    """last.pt from rank 0, with a checksum of what it holds, and best.pt (when best) as a second name of that file;
    each written whole or not at all. Returns the time of the save (the clock of timed saves)."""
    last = os.path.join(cfg.output_dir, "last.pt")
    if ctx.master:
        with atomic_open(last) as f:
            torch.save(dict(state, checksum=checksum(state)), f)
        # the folder holds a run now: no failure removes it
        CREATED.clear()
    if ctx.master and best:
        # one copy on the disk for both names (a hard link); a copy where the file system has no links
        with atomic_open(os.path.join(cfg.output_dir, "best.pt")) as f:
            try:
                os.remove(f.name)
                os.link(last, f.name)
            except OSError:
                shutil.copyfile(last, f.name)
    return time.time()


def stopped(cfg, ctx, step):
    """The Stopped exception of a stop request once last.pt is saved: its step and the command that continues."""
    launcher = f"torchrun --nproc_per_node {ctx.world}" if ctx.ddp else "python"
    return Stopped((SIGNALS or [signal.SIGTERM])[0], f"interrupted: saved {os.path.join(cfg.output_dir, 'last.pt')} "
                   f"at step {step}; continue with {launcher} {shlex.quote(sys.argv[0])} --resume auto --output-dir "
                   f"{shlex.quote(cfg.output_dir)}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """A file to write that replaces `path` only once complete, flushed to disk and renamed: a kill, a crash or a full
    disk never leaves a broken file, and keeps the previous one. A failure is a UserError that names the file."""
    try:
        with open(path + ".tmp", mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        # (torch.save reports a failed write as a RuntimeError)
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        kept = f"; the previous {os.path.basename(path)} is unchanged" if os.path.exists(path) else ""
        raise UserError(f"cannot write {path} ({reason}: is the disk full or read-only?){kept}") from None


def checksum(x, h=None):
    """sha1 of all that a checkpoint holds (tensor bytes, numbers, strings), so that a damaged file shows on load."""
    h = h or hashlib.sha1()
    if torch.is_tensor(x):
        h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    elif isinstance(x, (dict, list, tuple)):
        for k, v in sorted(x.items(), key=lambda kv: str(kv[0])) if isinstance(x, dict) else enumerate(x):
            checksum(v, h.update(repr(k).encode()) or h)
    else:
        h.update(repr(x).encode())
    return h.hexdigest()


def load_checkpoint(path, script):
    """A checkpoint that `script` (or a renamed copy) wrote, whole: its checksum holds. Anything else is a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint: corrupt, truncated or not written by torch.save "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "checksum" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt.pop("checksum") != checksum(ckpt):
        raise UserError(f"{path} is corrupt: what it holds does not match its checksum (a damaged disk or copy)")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    return ckpt


def cli(argv=None):
    """main() as a command: exit code 0 when done; 2 bad input or an unwritable file, 3 divergence, 128 + the signal
    after Ctrl-C / SIGTERM, 1 on a rank whose peer died: one line on stderr (rank 0 speaks for all)."""
    cfg, given = parse_config(argv)
    handlers = {s: signal.signal(s, quit_at_once) for s in (signal.SIGINT, signal.SIGTERM)}
    name, code, message, CREATED[:], SIGNALS[:] = os.path.basename(__file__), 0, None, [], []
    try:
        main(cfg, given)
    except (UserError, OSError) as e:
        code, message = 2, f"{name}: error: {e}"
    except Diverged as e:
        code, message = 3, f"{name}: error: {e}"
    except Stopped as e:
        code, message = 128 + e.args[0], e.args[1]
    except RuntimeError as e:
        # under torchrun: another process ended (its line says why), which broke this one's collective
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or "onnection" in str(e))):
            raise
        code, message = 1, f"{name}: rank {dist.get_rank()}: stopped, as another process ended"
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    # a run that ends with exit 2 before its first checkpoint leaves no folder (or lock file) that it made
    if code == 2 and CREATED:
        with contextlib.suppress(OSError):
            shutil.rmtree(CREATED[0]) if os.path.isdir(CREATED[0]) else os.remove(CREATED[0])
    if message and (not dist.is_initialized() or dist.get_rank() == 0 or code == 1):
        print(message, file=sys.stderr)
    if dist.is_initialized():
        # a process group left to the interpreter's exit aborts the process
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
