"""A user's own model through the plugin hook: a small MLP on a slice of the digits data."""

import torch
from sklearn.datasets import load_digits
from torch import nn


def make():
    raw = load_digits()
    x = torch.tensor(raw.data[:600], dtype=torch.float32) / 16
    y = torch.tensor(raw.target[:600])
    train = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 500, 50)]
    test = [(x[500:], y[500:])]
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))
    return model, train, test


def broken():
    raise RuntimeError("no data here")


class Tempered(nn.Module):
    """Logits scaled by sqrt(gain): a large learning rate pushes the gain below zero → NaN."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.body(x) * torch.sqrt(self.gain)


def unstable():
    model, train, test = make()
    return Tempered(), train, test
