"""Linear evaluation on the bag-of-features embeddings written by empssl_pretrain.py.

The whole embedding set lives on the device (CIFAR-10 train: 50,000 x 4096 in fp16 is 400 MB); a batch is
an index slice of the epoch's permutation, no DataLoader, and the loop syncs with the host only to log, so
100 epochs of 500 steps take seconds on a GPU. The recipe is the EMP-SSL code's: SGD, momentum 0.9,
lr 0.03, weight decay 5e-5, batch 100, cosine decay per epoch over 100 epochs.

    python empssl_pretrain.py --output-dir runs/empssl/c10
    python empssl_linear.py --dataset runs/empssl/c10/embeddings

Outputs in --output-dir: config.json, metrics.jsonl, last.pt (resumable), best.pt (best test top-1): the linear layer.
"""
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from knn import knn_accuracy

SCRIPT, RUNS = "empssl_linear", "runs/empssl-linear"  # checkpoints name the script that wrote them

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    dataset: str = arg("", "required: a folder with train.pt and test.pt written by empssl_pretrain.py (its embeddings/)")
    output_dir: str = arg("", "run folder (default runs/empssl-linear/<timestamp>)")
    resume: str = arg("", "a checkpoint of this script to resume from, or 'auto' for <output-dir>/last.pt if it exists")
    batch_size: int = arg(100, "embeddings per step")
    max_epochs: int = arg(100, "epochs of training")
    learning_rate: float = arg(0.03, "SGD (momentum 0.9) peak learning rate")
    weight_decay: float = arg(5e-5, "SGD weight decay")
    warmup_duration: float = arg(0.0, "fraction of the epochs spent in linear warm-up before the cosine decay")
    embedding_dim: int = arg(0, "dimension of the embeddings (0: read from the files; another value must match them)")
    num_neighbours: int = arg(20, "k of the kNN comparison at the start")
    temperature: float = arg(0.07, "temperature of the kNN comparison at the start")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    log_every: int = arg(100, "steps between progress-bar updates (the only host syncs of the loop)")
    seed: int = arg(42, "random seed")


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


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, never a traceback."""


# ----------------------------------------------------------------------------- data


def load_embeddings(folder, embedding_dim):
    """(train_x, train_y, test_x, test_y, classes) from folder/{train,test}.pt, every mismatch a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"--dataset {folder} is not a folder (expected the embeddings/ folder of an empssl_pretrain.py run)")
    splits = {}
    for name in ("train", "test"):
        path = os.path.join(folder, f"{name}.pt")
        d = read_torch_file(path, "embeddings file")  # empssl_pretrain.py writes <output-dir>/embeddings/{train,test}.pt
        missing = [k for k in ("embeddings", "labels", "dim", "classes") if not isinstance(d, dict) or k not in d]
        if missing:
            raise UserError(f"{path} lacks the keys {missing} of an empssl_pretrain.py embeddings file")
        x, y = d["embeddings"], d["labels"]
        if not (torch.is_tensor(x) and torch.is_tensor(y) and x.ndim == 2 and y.ndim == 1 and len(x) == len(y) and x.shape[1] == d["dim"]):
            raise UserError(f"{path}: embeddings {tuple(getattr(x, 'shape', ()))} and labels {tuple(getattr(y, 'shape', ()))} do not fit dim {d['dim']}")
        if len(x) == 0 or y.is_floating_point() or y.is_complex() or not x.is_floating_point() or not torch.isfinite(x).all():
            raise UserError(f"{path}: needs at least one embedding, finite float embeddings and integer labels")
        if y.numel() and (y.min() < 0 or y.max() >= len(d["classes"])):
            raise UserError(f"{path}: labels range over {y.min().item()}..{y.max().item()}, outside the {len(d['classes'])} classes")
        splits[name] = (x, y.long(), list(d["classes"]))
    (xtr, ytr, classes), (xte, yte, test_classes) = splits["train"], splits["test"]
    if xtr.shape[1] != xte.shape[1]:
        raise UserError(f"train embeddings have dim {xtr.shape[1]}, test embeddings {xte.shape[1]}")
    if classes != test_classes:
        raise UserError(f"train.pt has {len(classes)} classes, test.pt {len(test_classes)} (or in another order)")
    if embedding_dim and embedding_dim != xtr.shape[1]:
        raise UserError(f"--embedding-dim {embedding_dim} disagrees with the files' dimension {xtr.shape[1]}")
    return xtr, ytr, xte, yte, classes


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def evaluate(head, inputs, labels, batch_size=1024):
    """(cross-entropy, top-1 %, top-5 %) of head (the classifier, or its fc on cached features) on inputs."""
    was_training = head.training
    head.eval()
    sums = torch.zeros(3, device=labels.device)  # summed loss, top-1 hits, top-5 hits: one host sync at the end
    for i in range(0, len(inputs), batch_size):
        logits, y = head(inputs[i:i + batch_size]).float(), labels[i:i + batch_size]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(1).sum()])
    head.train(was_training)
    loss, top1, top5 = (sums / len(inputs)).tolist()
    return loss, 100 * top1, 100 * top5


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay towards 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


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
        raise UserError(f"{path} is not a readable {what}: corrupt, truncated or not written by torch.save ({type(e).__name__})")


def load_checkpoint(path, script):
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not {"script", "model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint written by these scripts")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    return ckpt


def check_config(cfg):
    problems = [(not cfg.dataset, "--dataset is required (the embeddings/ folder of an empssl_pretrain.py run)"),
                (cfg.embedding_dim < 0 or cfg.weight_decay < 0, "--embedding-dim and --weight-decay must be >= 0"),
                (cfg.batch_size < 1, "--batch-size must be positive"),
                (cfg.max_epochs < 1, "--max-epochs must be at least 1"),
                (cfg.learning_rate <= 0, "--learning-rate must be positive"),
                (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
                (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
                (cfg.log_every < 1, "--log-every must be at least 1"),
                (cfg.device not in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu"),
                (cfg.precision not in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
                (cfg.device == "cuda" and not torch.cuda.is_available(), "--device cuda but no GPU is available")]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def main(cfg):
    check_config(cfg)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("fp32" if device.type == "cpu" else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    ptdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    autocast = torch.autocast(device.type, dtype=ptdtype, enabled=precision != "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    cfg.output_dir = cfg.output_dir or os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S"))

    # data: all embeddings on the device, float32 (fp16 on disk)
    xtr, ytr, xte, yte, classes = load_embeddings(cfg.dataset, cfg.embedding_dim)
    xtr, ytr, xte, yte = xtr.to(device).float(), ytr.to(device), xte.to(device).float(), yte.to(device)
    steps_per_epoch = math.ceil(len(xtr) / cfg.batch_size)  # every embedding, the last batch may be smaller
    total_steps = cfg.max_epochs * steps_per_epoch
    warmup_epochs = int(cfg.warmup_duration * cfg.max_epochs)

    # model, optimizer, resume
    model = nn.Linear(xtr.shape[1], len(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_step, best = 0, {"top1": -1.0, "top5": -1.0, "epoch": 0}
    resume = os.path.join(cfg.output_dir, "last.pt") if cfg.resume == "auto" else cfg.resume
    if resume and (cfg.resume != "auto" or os.path.exists(resume)):
        ckpt = load_checkpoint(resume, SCRIPT)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"{resume} does not fit these embeddings: {str(e).splitlines()[-1].strip()[:200]}")
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the command line, not the checkpoint, sets the recipe
            group["weight_decay"] = cfg.weight_decay
        if scaler.is_enabled() and ckpt["scaler"]:  # fp16 both then and now
            scaler.load_state_dict(ckpt["scaler"])
        start_step, best = ckpt["step"], ckpt["best"]
        print(f"resumed from {resume} at step {start_step} (epoch {start_step / steps_per_epoch:.2f})")

    top1, top5 = knn_accuracy(xtr, ytr, xte, yte, cfg.num_neighbours, cfg.temperature, len(classes))
    print(f"knn on these embeddings: top1 {top1:.2f} top5 {top5:.2f} (k={cfg.num_neighbours}, T={cfg.temperature})")
    os.makedirs(cfg.output_dir, exist_ok=True)
    run_info = dict(dataclasses.asdict(cfg), device=str(device), precision_used=precision, num_train=len(xtr), num_test=len(xte),
                    num_classes=len(classes), embedding_dim=xtr.shape[1], steps_per_epoch=steps_per_epoch, knn_top1=top1, knn_top5=top5)
    with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
        json.dump(run_info, f, indent=2)
    print(json.dumps(run_info))

    def checkpoint(step):
        return {"script": SCRIPT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "best": best, "config": dataclasses.asdict(cfg), "classes": classes}

    stop = []  # Ctrl-C / SIGTERM: finish the step, save last.pt, exit
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))

    t_start, step = time.time(), start_step
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or step == start_step:  # the epoch's order is a pure function of (seed, epoch): resumable
            perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch)).to(device)
            bar = tqdm(total=steps_per_epoch, initial=i, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", mininterval=1, leave=False)
            loss_sum, t_epoch, steps_done = torch.zeros((), device=device), time.time(), 0
        lr = lr_at(epoch, cfg.max_epochs, warmup_epochs, cfg.learning_rate)  # per epoch, as the EMP-SSL code
        for group in optimizer.param_groups:
            group["lr"] = lr

        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        with autocast:
            logits = model(xtr[idx])
        loss = F.cross_entropy(logits.float(), ytr[idx])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        steps_done += 1
        bar.update()

        if (step + 1) % cfg.log_every == 0:  # the only host sync inside an epoch
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        stopping = bool(stop)
        if stopping and i + 1 < steps_per_epoch:  # at an epoch's last step the epoch end below evaluates and saves first
            atomic_save(checkpoint(step + 1), os.path.join(cfg.output_dir, "last.pt"))

        if i + 1 == steps_per_epoch:  # end of epoch: test, metrics, checkpoints
            bar.close()
            with autocast:
                test_loss, top1, top5 = evaluate(model, xte, yte)
            stats = {"epoch": epoch + 1, "step": step + 1, "train_loss": loss_sum.item() / steps_done, "lr": lr, "test_loss": test_loss,
                     "top1": top1, "top5": top5, "epoch_seconds": round(time.time() - t_epoch, 3)}
            ckpt = checkpoint(step + 1)
            if top1 > best["top1"]:
                best = ckpt["best"] = {"top1": top1, "top5": top5, "epoch": epoch + 1}
                atomic_save(ckpt, os.path.join(cfg.output_dir, "best.pt"))
            atomic_save(ckpt, os.path.join(cfg.output_dir, "last.pt"))
            with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(stats) + "\n")
            print(f"epoch {epoch + 1}/{cfg.max_epochs} train loss {stats['train_loss']:.4f} lr {lr:.2e} test loss {test_loss:.4f} "
                  f"top1 {top1:.2f} top5 {top5:.2f} {stats['epoch_seconds']:.2f}s", flush=True)
        if stopping:  # Ctrl-C / SIGTERM: last.pt holds this step
            bar.close()
            print(f"interrupted: saved {os.path.join(cfg.output_dir, 'last.pt')} at step {step + 1}; continue with --resume auto --output-dir {cfg.output_dir}", file=sys.stderr)
            sys.exit(128 + stop[0])
    print(f"done: best top1 {best['top1']:.2f} top5 {best['top5']:.2f} (epoch {best['epoch']}), last top1 {top1:.2f} top5 {top5:.2f} "
          f"in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")


if __name__ == "__main__":
    cfg = parse_config()
    try:
        main(cfg)
    except (UserError, OSError) as e:  # OSError: an unwritable --output-dir or --data-dir, a full disk
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
