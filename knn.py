"""Weighted k-nearest-neighbour evaluation of frozen features, shared by the four scripts.

Cosine similarity between L2-normalised features; each of the k nearest training samples votes
for its class with weight exp(similarity / temperature). This is the monitor of InstDisc
(Wu et al. 2018, https://arxiv.org/abs/1805.01978, Sec. 3.4) as used by the MMCR and EMP-SSL
reference code. Plain torch on any device; the test set is processed in chunks so that a full
CIFAR-10 evaluation (10k x 50k similarities) never holds more than chunk_size x N_train floats.
features() computes the features themselves, with a progress bar.
"""
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

_warned = set()


def knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size=1024):
    """(N_test, num_classes) weighted-vote scores of every test sample."""
    if k > train_features.shape[0]:
        # once per (k, bank size), not once per call
        if (k, train_features.shape[0]) not in _warned:
            _warned.add((k, train_features.shape[0]))
            n = train_features.shape[0]
            warnings.warn(f"kNN: k={k} is larger than the memory bank ({n} samples); using k={n}")
        k = train_features.shape[0]
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(train.device).long()
    scores = torch.zeros(test_features.shape[0], num_classes, device=train.device)
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].to(train.device).float(), dim=1)
        # (chunk, k) nearest neighbours by cosine
        sim, idx = (test @ train.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        scores[start:start + chunk_size].scatter_add_(1, labels[idx], weight)
    return scores


def knn_accuracy(train_features, train_labels, test_features, test_labels, k, temperature, num_classes,
                 chunk_size=1024):
    """(top1, top5) accuracy in percent; top-5 counts min(5, num_classes) guesses."""
    scores = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    pred = scores.topk(min(5, num_classes), dim=1).indices
    hit = pred == test_labels.to(pred.device).long().view(-1, 1)
    top1 = hit[:, 0].float().mean().item() * 100
    top5 = hit.any(dim=1).float().mean().item() * 100
    return top1, top5


@torch.no_grad()
def features(model, images, transform, desc):
    """model(transform(chunk)) of every chunk of images, as float32, in eval mode, with a progress bar that moves (a
    chunk takes a CPU a second or so)."""
    was_training, out = model.training, []
    model.eval()
    with tqdm(total=len(images), desc=desc, unit="img", leave=False) as bar:
        for chunk in images.split(1024 if images.is_cuda else 64):
            out.append(model(transform(chunk)).float())
            bar.update(len(chunk))
    model.train(was_training)
    return torch.cat(out)
