"""Networks: one small CNN encoder shared by the slice classifier and the MIL instance scorer.

Sharing the encoder is how the two weak tasks learn from each other ("dual-task mutual"): the MIL network
starts from the classifier's encoder and is fine-tuned on patch instances; its instance scores then refine
the classifier's Grad-CAM maps. The segmenter is MONAI's BasicUNet.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """Four conv blocks with 2x pooling between them: output stride 8, `width * 8` channels."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.block1 = _block(1, width)
        self.block2 = _block(width, width * 2)
        self.block3 = _block(width * 2, width * 4)
        self.block4 = _block(width * 4, width * 8)
        self.pool = nn.MaxPool2d(2)
        self.channels = width * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) slices -> (B, `channels`, S/8, S/8) features."""
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        x = self.pool(self.block3(x))
        return self.block4(x)


class SliceClassifier(nn.Module):
    """Lesion / no-lesion logit for a lung-masked slice (global average + max pooling of the encoder)."""

    def __init__(self, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.encoder = Encoder(width)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * self.encoder.channels, 1))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2C) average + max pooled encoder features: what the head reads (predict_logits, feature_probe)."""
        features = self.encoder(x)
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) slices -> (B, 1) lesion logits."""
        return self.head(self.pooled(x))


class MILNet(nn.Module):
    """Instance scorer + bag pooling: (B, K, 1, P, P) patches, (B, K) validity -> bag logit, instance logits.

    Bag pooling is attention-weighted (Ilse et al. 2018) over valid instances, combined with the max
    instance, so a bag is positive when at least one instance is.
    """

    def __init__(self, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.encoder = Encoder(width)
        channels = self.encoder.channels
        self.instance_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, 1))
        self.attention = nn.Sequential(nn.Linear(channels, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, patches: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 1, P, P) patches and (B, K) validity -> (B,) bag logits, (B, K) instance logits."""
        batch, k = patches.shape[:2]
        features = self.encoder(patches.flatten(0, 1)).mean(dim=(2, 3))
        instance = self.instance_head(features).view(batch, k)
        attn = self.attention(features).view(batch, k).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(attn, dim=1).nan_to_num(0.0)
        masked = instance.masked_fill(~valid, -30.0)
        bag = 0.5 * (weights * masked).sum(dim=1) + 0.5 * masked.amax(dim=1)
        return bag, instance


def build_segmenter(features: tuple[int, ...] = (16, 16, 32, 64, 128, 16)) -> nn.Module:
    """MONAI BasicUNet, 2-D, one input channel (lung-masked slice), one output logit."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=features, dropout=0.1)
