"""Linear evaluation on the bag-of-features embeddings written by empssl_pretrain.py.

The whole embedding set lives on the device (CIFAR-10 train: 50,000 x 4096 in fp16 is 400 MB); a batch is
an index slice of the epoch's permutation, no DataLoader, and the loop syncs with the host only to log, so
100 epochs of 500 steps take seconds on a GPU. The recipe is the EMP-SSL code's: SGD, momentum 0.9,
lr 0.03, weight decay 5e-5, batch 100, cosine decay per epoch over 100 epochs.

    python empssl_pretrain.py --output-dir runs/empssl/c10
    python empssl_linear.py --dataset runs/empssl/c10/embeddings

Outputs in --output-dir: config.json, metrics.jsonl, last.pt (resumable), best.pt (best test top-1): the linear layer.
Exit codes: 0 done, 2 bad input (one line on stderr), 3 training diverged, 128 + signal after Ctrl-C / SIGTERM.
"""
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from knn import knn_accuracy

# checkpoints name the script that wrote them
SCRIPT, RUNS = "empssl_linear", "runs/empssl-linear"

# ----------------------------------------------------------------------------- config


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # the method: edit these
    dataset: str = arg("", "required: a folder with train.pt and test.pt written by empssl_pretrain.py (its "
                       "embeddings/)")
    batch_size: int = arg(100, "embeddings per step")
    max_epochs: int = arg(100, "epochs of training")
    learning_rate: float = arg(0.03, "SGD (momentum 0.9) peak learning rate")
    weight_decay: float = arg(5e-5, "SGD weight decay")
    warmup_duration: float = arg(0.0, "fraction of the epochs spent in linear warm-up before the cosine decay")
    embedding_dim: int = arg(0, "dimension of the embeddings (0: read from the files; another value must match them)")
    num_neighbours: int = arg(20, "k of the kNN comparison at the start")
    temperature: float = arg(0.07, "temperature of the kNN comparison at the start")
    # the run: where, how, how often
    output_dir: str = arg("", "run folder (default runs/empssl-linear/<timestamp>); one that holds a run needs "
                          "--resume")
    resume: str = arg("", "a checkpoint of this script to resume from, or 'auto' for <output-dir>/last.pt if it exists")
    device: str = arg("auto", "auto, cuda or cpu")
    precision: str = arg("auto", "auto (bf16 if supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    log_every: int = arg(100, "steps between progress-bar updates (the only host syncs of the loop)")
    checkpoint_minutes: float = arg(30.0, "also save last.pt inside an epoch, at a log step, this many minutes "
                                    "after the last save (0: only at epoch ends)")
    seed: int = arg(42, "random seed")


# ----------------------------------------------------------------------------- data


def load_embeddings(folder, embedding_dim):
    """(train_x, train_y, test_x, test_y, classes) from folder/{train,test}.pt, every mismatch a UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"--dataset {folder} is not a folder (expected the embeddings/ folder of an "
                        f"empssl_pretrain.py run)")
    splits = {}
    for name in ("train", "test"):
        path = os.path.join(folder, f"{name}.pt")
        # empssl_pretrain.py writes <output-dir>/embeddings/{train,test}.pt
        d = read_torch_file(path, "embeddings file")
        missing = [k for k in ("embeddings", "labels", "dim", "classes") if not isinstance(d, dict) or k not in d]
        if missing:
            raise UserError(f"{path} lacks the keys {missing} of an empssl_pretrain.py embeddings file")
        x, y = d["embeddings"], d["labels"]
        tensors = torch.is_tensor(x) and torch.is_tensor(y)
        if not (tensors and x.ndim == 2 and y.ndim == 1 and len(x) == len(y) and x.shape[1] == d["dim"]):
            raise UserError(f"{path}: embeddings {tuple(getattr(x, 'shape', ()))} and labels "
                            f"{tuple(getattr(y, 'shape', ()))} do not fit dim {d['dim']}")
        integers = not (y.is_floating_point() or y.is_complex())
        if len(x) == 0 or not integers or not x.is_floating_point() or not x.isfinite().all():
            raise UserError(f"{path}: needs at least one embedding, finite float embeddings and integer labels")
        if y.numel() and (y.min() < 0 or y.max() >= len(d["classes"])):
            raise UserError(f"{path}: labels range over {y.min().item()}..{y.max().item()}, outside the "
                            f"{len(d['classes'])} classes")
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
    # summed loss, top-1 hits, top-5 hits: one host sync at the end
    sums = torch.zeros(3, device=labels.device)
    for i in range(0, len(inputs), batch_size):
        logits, y = head(inputs[i:i + batch_size]).float(), labels[i:i + batch_size]
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.view(-1, 1)
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), hit[:, 0].sum(), hit.any(1).sum()])
    head.train(was_training)
    loss, top1, top5 = (sums / len(inputs)).tolist()
    return loss, 100 * top1, 100 * top5


# ----------------------------------------------------------------------------- train


def lr_at(step, total_steps, warmup_steps, base_lr):
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to 0: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def main(cfg):
    check_config(cfg)
    if "RANK" in os.environ:
        raise UserError("empssl_linear.py trains one linear layer on one device: start it with python, not torchrun")
    ddp, rank, world, device, precision, autocast = setup(cfg)
    cfg.output_dir = cfg.output_dir or os.path.join(RUNS, time.strftime("%Y%m%d-%H%M%S"))
    if not cfg.resume:
        refuse_to_overwrite(cfg.output_dir)

    # data: all embeddings on the device, float32 (fp16 on disk)
    xtr, ytr, xte, yte, classes = load_embeddings(cfg.dataset, cfg.embedding_dim)
    xtr, ytr, xte, yte = xtr.to(device).float(), ytr.to(device), xte.to(device).float(), yte.to(device)
    # every embedding: the last batch may be smaller
    steps_per_epoch = math.ceil(len(xtr) / cfg.batch_size)
    warmup_epochs = int(cfg.warmup_duration * cfg.max_epochs)

    # model, optimizer, resume
    model = nn.Linear(xtr.shape[1], len(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=0.9, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ckpt = resume(cfg, model, optimizer, scaler, steps_per_epoch, True, "embeddings of another dimension?")
    start_step, best = (ckpt["step"], ckpt["best"]) if ckpt else (0, {"top1": -1.0, "top5": -1.0, "epoch": 0})
    top1, top5 = knn_accuracy(xtr, ytr, xte, yte, cfg.num_neighbours, cfg.temperature, len(classes))
    print(f"knn on these embeddings: top1 {top1:.2f} top5 {top5:.2f} (k={cfg.num_neighbours}, T={cfg.temperature})")
    write_run_info(cfg, device=str(device), precision_used=precision, num_train=len(xtr), num_test=len(xte),
                   num_classes=len(classes), embedding_dim=xtr.shape[1], steps_per_epoch=steps_per_epoch, knn_top1=top1,
                   knn_top5=top5)

    def checkpoint(step):
        return {"script": SCRIPT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch, "best": best,
                "config": dataclasses.asdict(cfg), "classes": classes}

    control, t_start = RunControl(cfg.checkpoint_minutes, ddp, True, device), time.time()
    for epoch in range(start_step // steps_per_epoch, cfg.max_epochs):
        first = max(0, start_step - epoch * steps_per_epoch)
        perm = epoch_order(len(xtr), cfg.seed, epoch, device)
        loss_sum, t_epoch, stop = torch.zeros((), device=device), time.time(), False
        # per epoch, as the EMP-SSL code
        lr = set_lr(optimizer, lr_at(epoch, cfg.max_epochs, warmup_epochs, cfg.learning_rate))
        # the bar closes also when an error (a divergence) leaves the loop
        with tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", mininterval=1,
                  leave=False) as bar:
            for i in range(first, steps_per_epoch):
                step = epoch * steps_per_epoch + i
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                with autocast:
                    logits = model(xtr[idx])
                loss = F.cross_entropy(logits.float(), ytr[idx])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                bar.update()
                if control.syncs_at(step + 1, cfg.log_every):
                    stop, save = control.poll(step + 1, loss, model)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                    # a stop or a timed save at an epoch's last step is left to the epoch end below
                    if (stop or save) and i + 1 < steps_per_epoch:
                        control.save(checkpoint(step + 1), cfg.output_dir, "last.pt")
                    if stop:
                        break

        # end of epoch: test, metrics, checkpoints
        if i + 1 == steps_per_epoch:
            stop = control.poll(step + 1, loss, model)[0] or stop
            with autocast:
                test_loss, top1, top5 = evaluate(model, xte, yte)
            stats = {"epoch": epoch + 1, "step": step + 1, "train_loss": loss_sum.item() / (steps_per_epoch - first),
                     "lr": lr, "test_loss": test_loss, "top1": top1, "top5": top5,
                     "epoch_seconds": round(elapsed(t_epoch, device), 3)}
            improved = top1 > best["top1"]
            if improved:
                best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
            control.save(checkpoint(step + 1), cfg.output_dir, *(["best.pt"] if improved else []), "last.pt")
            append_metrics(cfg.output_dir, stats)
            print(f"epoch {epoch + 1}/{cfg.max_epochs} train loss {stats['train_loss']:.4f} lr {lr:.2e} "
                  f"test loss {test_loss:.4f} top1 {top1:.2f} top5 {top5:.2f} {stats['epoch_seconds']:.2f}s",
                  flush=True)
        if stop:
            control.interrupted(cfg.output_dir, step + 1)
    print(f"done: best top1 {best['top1']:.2f} top5 {best['top5']:.2f} (epoch {best['epoch']}), last top1 {top1:.2f} "
          f"top5 {top5:.2f} in {time.time() - t_start:.1f}s; checkpoints in {cfg.output_dir}")


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
    problems = [(not cfg.dataset, "--dataset is required (the embeddings/ folder of an empssl_pretrain.py run)"),
                (cfg.embedding_dim < 0 or cfg.weight_decay < 0, "--embedding-dim and --weight-decay must be >= 0"),
                (cfg.batch_size < 1, "--batch-size must be positive"),
                (cfg.max_epochs < 1, "--max-epochs must be at least 1"),
                (cfg.learning_rate <= 0, "--learning-rate must be positive"),
                (not 0 <= cfg.warmup_duration < 1, "--warmup-duration must be in [0, 1)"),
                (cfg.num_neighbours < 1 or cfg.temperature <= 0, "--num-neighbours and --temperature must be positive"),
                (cfg.log_every < 1, "--log-every must be at least 1"),
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


def set_lr(optimizer, lr):
    """Write lr into every param group (times its lr_scale, if it has one); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


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


if __name__ == "__main__":
    cfg = parse_config()
    try:
        main(cfg)
    # OSError: an unwritable --output-dir or --data-dir, a full disk. Exit code 2: bad input; 3: training diverged.
    except (UserError, OSError, Diverged) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)
