"""Models no one on the team wrote, through the plugin hook, on small learnable tasks.

torchvision's and Hugging Face's definitions with random init; images are class templates plus
noise (3×32×32), token sequences carry a class-specific token. Offline: nothing is downloaded.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qat_core import library

CLASSES = 10


def images(n: int = 800, size: int = 32, seed: int = 0) -> tuple[list, list]:
    """Class template + noise, split 3:1 into batches of 32 (train) and one test batch."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn((CLASSES, 3, size, size), generator=g)
    y = torch.arange(n) % CLASSES
    x = templates[y] + torch.randn((n, 3, size, size), generator=g)
    cut = n * 3 // 4
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, cut, 32)], [(x[cut:], y[cut:])]


def tokens(n: int = 640, length: int = 16, vocab: int = 100, seed: int = 0) -> tuple[list, list]:
    """Sequences of 8..16 random tokens 20..99, padded with 0, carrying three copies of the class's own
    token (10 + class) at random places."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(20, vocab, (n, length), generator=g)
    for i in range(n):
        used = int(torch.randint(8, length + 1, (), generator=g))
        x[i, torch.randperm(used, generator=g)[:3]] = 10 + y[i]
        x[i, used:] = 0  # padding
    cut = n * 3 // 4
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, cut, 32)], [(x[cut:], y[cut:])]


def torchvision_model(name: str) -> nn.Module:
    tv = library.import_torchvision()
    if name == "vit":  # a small VisionTransformer for 32×32 inputs
        return tv.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64,
                                           mlp_dim=128, num_classes=CLASSES)
    return tv.models.get_model(name, num_classes=CLASSES)


def _vision(name: str, size: int = 32, n: int = 480):
    def factory():
        train, test = images(n, size)
        return torchvision_model(name), train, test
    factory.__name__ = name
    return factory


resnet18 = _vision("resnet18")
resnet18_224 = _vision("resnet18", 224, 96)  # latency scale, for benchmarks/bench_int8.py
mobilenet_v2_224 = _vision("mobilenet_v2", 224, 96)
mobilenet_v2 = _vision("mobilenet_v2")
mobilenet_v3_small = _vision("mobilenet_v3_small")
efficientnet_b0 = _vision("efficientnet_b0")
vit = _vision("vit")


class BertClassifier(nn.Module):
    """A tiny Hugging Face BERT sequence classifier built from a config (no hub): token ids → logits."""

    def __init__(self, attn_implementation: str = "sdpa"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        library.import_torchvision()  # transformers imports it
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=32, num_labels=4,
                            attn_implementation=attn_implementation)
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # token 0 pads: masked out of attention
        return self.bert(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits


def bert():
    train, test = tokens()
    return BertClassifier(), train, test


class UsersNet(nn.Module):
    """A user's own code: BN and activations called in forward (not in an nn.Sequential), functional
    residual adds, a ReLU6 as F.hardtanh, a concatenation and a mean over the spatial dimensions."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.a_bn = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 1)
        self.mix = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.nn.functional.hardtanh(self.a_bn(self.a(x)), 0.0, 6.0) + x
        z = torch.cat([y, self.b(y).relu()], dim=1)
        return self.head(self.mix(z).mean(dim=(2, 3)))


def users_net():
    train, test = images()
    return UsersNet(), train, test
