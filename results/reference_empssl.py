"""Train the EMP-SSL reference (bartoszzuk/emp-ssl) with its own code and defaults on an ImageFolder, then evaluate
its checkpoint with empssl_pretrain.py's bag-of-features kNN and write embeddings for empssl_linear.py.

    python results/reference_empssl.py --reference path/to/emp-ssl --dataset path/to/cifar10-jpeg \
        --output-dir runs/reference-empssl
    python empssl_linear.py --dataset runs/reference-empssl/embeddings

Why: our EMP-SSL scores 5 points below the reference's published numbers, which came from the original CIFAR-10
files. Training the reference's own code on our copy of the data (JPEG quality 75) on the same GPU tells the data
(it scores like ours) from our training (it scores like its README).

The reference's code is not part of this repository: fetch it (commit c7d8a38 was read for this harness) and pass
its folder; it needs lightning and torchmetrics. This harness changes nothing in its training: it builds the objects
its pretrain.py builds, from its own argument parser (so its defaults), and runs Lightning's Trainer as it does. Three
things differ, all outside the training maths: its CIFAR10 class is replaced by the ImageFolder (the same images,
subset and order as our runs, as PIL images, which its transforms expect); its end-of-training validation is skipped
(a 128-patch PIL evaluation of 60,000 images, about an hour of CPU work), which our evaluation replaces (checked
equal on the CPU); and without a GPU (a smoke test) it trains on the CPU in fp32 instead of fp16 mixed precision.
Its cosine schedule spans 50,000 // batch steps whatever the dataset, so a --limit-train run stops early in it.

Writes to --output-dir: config.json, metrics.json (training seconds, steps, kNN top-1 / top-5), reference.pt (the
weights in empssl_pretrain.py's layout) and embeddings/{train,test}.pt.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import empssl_pretrain as ours  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="a checkout of bartoszzuk/emp-ssl")
    parser.add_argument("--dataset", required=True, help="an ImageFolder root with train/<class>/* and test/<class>/*")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data-dir", default="./data", help="where empssl_pretrain.py caches the decoded images")
    parser.add_argument("--limit-train", type=int, default=0, help="a random subset, as empssl_pretrain.py's")
    parser.add_argument("--limit-test", type=int, default=0, help="a random subset, as empssl_pretrain.py's")
    parser.add_argument("--valid-patches", type=int, default=128, help="patches per image in our evaluation")
    parser.add_argument("--num-workers", type=int, default=0, help="its DataLoader workers (0: its default)")
    args, reference_args = parser.parse_known_args()
    return args, reference_args


def image_folder_as_cifar10(images, labels):
    """A stand-in for torchvision's CIFAR10 class, as the reference calls it, over our decoded uint8 images."""
    from PIL import Image

    class FolderAsCIFAR10(torch.utils.data.Dataset):
        def __init__(self, root, transform=None, download=False, train=True):
            self.images, self.labels = images[0 if train else 1], labels[0 if train else 1]
            self.transform = transform

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            image = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
            return self.transform(image), int(self.labels[i])

    return FolderAsCIFAR10


def to_our_layout(reference_model, hidden_dim, projection_dim):
    """The reference's ResNet18 (Sequential backbone with its head, bias-free hidden layers) as our EMPSSLModel."""
    theirs = reference_model.state_dict()
    # their backbone: 0 conv1, 1 bn1, 2 relu, 3-6 layer1-4, 7 avgpool, 8 head (1 Linear, 2 BatchNorm1d)
    names = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
    state = {}
    for key, value in theirs.items():
        parts = key.split(".")
        if parts[0] == "backbone" and parts[1] in names:
            state[".".join(["backbone", names[parts[1]], *parts[2:]])] = value
        elif parts[0] == "backbone" and parts[1] == "8":
            state[".".join(["pre_feature", str(int(parts[2]) - 1), *parts[3:]])] = value
        else:
            state[key] = value
    model = ours.EMPSSLModel(64, hidden_dim, projection_dim)
    # their hidden Linear layers have no bias: ours are zero
    for key in ("pre_feature.0.bias", "projector.0.bias"):
        state[key] = torch.zeros_like(model.state_dict()[key])
    model.load_state_dict(state)
    return model


def main():
    args, reference_args = parse_args()
    os.makedirs(args.output_dir, exist_ok=False)
    sys.path.insert(0, os.path.abspath(args.reference))
    import lightning
    import emp_ssl.data
    from emp_ssl.config import PretrainConfig
    from emp_ssl.models import KNearestNeighbours, ResNet18
    from emp_ssl.modules import PretrainModule
    import pretrain as reference

    # the same images, subsets and order as empssl_pretrain.py --dataset ... --limit-train ...
    cfg = ours.Config(dataset=os.path.abspath(args.dataset), data_dir=args.data_dir, limit_train=args.limit_train,
                      limit_test=args.limit_test, valid_patches=args.valid_patches, output_dir=args.output_dir)
    ctx = ours.setup(cfg)
    data = ours.load_dataset(cfg, ctx)
    emp_ssl.data.CIFAR10 = image_folder_as_cifar10((data.train_x.cpu(), data.test_x.cpu()),
                                                   (data.train_y.cpu(), data.test_y.cpu()))

    # its defaults, from its own parser
    sys.argv = ["pretrain.py", "--dataset", args.dataset, *reference_args]
    if args.num_workers:
        sys.argv += ["--num-workers", str(args.num_workers)]
    config = PretrainConfig.from_command_line(reference.parse_arguments())
    cuda = torch.cuda.is_available()
    # As its pretrain(), with validation and logging switched off. deterministic="warn": the same cuDNN settings as
    # its deterministic=True, but an op without a deterministic CUDA kernel in today's torch warns instead of failing.
    lightning.seed_everything(config.seed)
    datamodule = emp_ssl.data.PretrainDataModule(config)
    knn = KNearestNeighbours(config.num_neighbours, config.temperature)
    model = ResNet18(config)
    module = PretrainModule(model, knn, config)
    trainer = lightning.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="16-mixed" if cuda else "32",
                                max_epochs=config.max_epochs, logger=False, enable_checkpointing=False,
                                deterministic="warn", limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10)
    start = time.time()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.time() - start

    # our evaluation of its weights: inputs as it trained on them (pixels 0..255, then Normalize(0.5, 0.5))
    model = to_our_layout(model.cpu(), config.hidden_dim, config.projection_dim)
    check_layout(module.model, model)
    device = ctx.device
    model = model.to(device, memory_format=torch.channels_last)
    unscaled = (0.5 / 255,) * 3
    aug = dict(ours.AUGMENT, size=32, norm=(unscaled, unscaled))
    cfg.num_neighbours, cfg.temperature, cfg.seed = config.num_neighbours, config.temperature, config.seed
    start = time.time()
    scores = ours.evaluate(cfg, model, data, aug, ctx)
    eval_seconds = time.time() - start
    torch.save(model.state_dict(), os.path.join(args.output_dir, "reference.pt"))
    metrics = {"train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "steps": trainer.global_step, **scores}
    info = {"harness_args": vars(args), "reference_config": {k: str(v) for k, v in vars(config).items()},
            "reference_commit": git_commit(args.reference), "device": str(device),
            "precision": "16-mixed" if cuda else "32", "torch": torch.__version__, "lightning": lightning.__version__}
    with open(os.path.join(args.output_dir, "config.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))


def check_layout(reference_model, model, atol=1e-4):
    """The converted model computes what the reference's does (eval mode, random inputs), or the run stops here."""
    x = torch.randn(4, 3, 32, 32)
    reference_model, model = reference_model.cpu().float().eval(), model.cpu().float().eval()
    with torch.no_grad():
        z_ref, h_ref = reference_model(x)
        h, z = model(x)
    if not (torch.allclose(h, h_ref, atol=atol) and torch.allclose(z, z_ref, atol=atol)):
        sys.exit(f"reference_empssl.py: the converted weights compute other outputs (h {(h - h_ref).abs().max():.3g}, "
                 f"z {(z - z_ref).abs().max():.3g})")


def git_commit(folder):
    try:
        return subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


if __name__ == "__main__":
    main()
