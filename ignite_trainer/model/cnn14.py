"""PANNs CNN14 (Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks for Audio Pattern
Recognition", 2020) as model ``cnn14``, so that its published AudioSet checkpoint initialises our trunk.

The module names are the published code's (``bn0`` over the mel bins, ``conv_block1`` .. ``conv_block6``
each with ``conv1``, ``conv2``, ``bn1``, ``bn2``, then ``fc1``), so a published checkpoint (a torch file
holding ``{"model": state_dict}``) loads strictly into everything but the head with ``--init-from``. The
published head ``fc_audioset`` (527 AudioSet classes) and its feature extractor (``spectrogram_extractor``,
``logmel_extractor``: this project computes log-mel features in its feature cache) are dropped; our
two-logit ``head`` starts fresh. Nothing is ever downloaded: the user places the file locally.

The model declares the front-end it was published with (32 kHz, 64 mel bands, a 1024-sample window and
FFT, hop 320 samples, 50 - 14000 Hz), so a ``cnn14`` run computes its features that way (`register_model`).
Our features are natural-log mel power z-scored per band, the published ones are dB log-mel; ``bn0``
normalises per mel band, and in training mode its statistics adapt to ours (see docs/fine-tuning.md).

``width`` (default 64, the published model: about 80 M parameters with the head) scales every channel
count; only the default loads the published checkpoint. Smaller widths exist for tests and quick trials.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ignite_trainer.model.registry import register_model

#: The published model's feature front-end, in `TrainConfig` fields: 32 kHz, window and FFT 1024 samples
#: (32 ms), hop 320 samples (10 ms), 64 mel bands from 50 to 14000 Hz.
CNN14_FRONT_END = {"sample_rate": 32000, "n_mels": 64, "n_fft": 1024, "win_ms": 32.0, "hop_ms": 10.0,
                   "band_low_hz": 50.0, "band_high_hz": 14000.0}
#: Keys of the published checkpoint that are not this model's: its AudioSet head and its feature extractor.
CNN14_FOREIGN_KEYS = ("fc_audioset.", "spectrogram_extractor.", "logmel_extractor.")


class ConvBlock(nn.Module):
    """Two 3x3 convolutions without bias, each followed by BatchNorm and ReLU, then average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


@register_model("cnn14", front_end=CNN14_FRONT_END, foreign_keys=CNN14_FOREIGN_KEYS)
class Cnn14(nn.Module):
    """CNN14 over log-mel windows ``[B, n_mels, T]``: six conv blocks (the first five pool time and
    frequency by 2), mean over frequency, max + mean over time, ``fc1`` (ReLU), then a fresh linear ``head``.

    Its "attention" is uniform over the ``T / 32`` time steps left after pooling (the model pools by max
    and mean, not by attention), so it fits the output contract. A window needs at least 32 frames and
    32 mel bands (five poolings by 2).

    Example::

        model = build_model("cnn14", n_mels=64)
        logits, attention = model(torch.randn(2, 64, 400))     # [2, 2], [2, 12]
    """

    def __init__(self, n_mels: int = 64, n_labels: int = 2, width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        c = [width * m for m in (1, 2, 4, 8, 16, 32)]
        self.bn0 = nn.BatchNorm2d(n_mels)
        self.conv_block1 = ConvBlock(1, c[0])
        self.conv_block2 = ConvBlock(c[0], c[1])
        self.conv_block3 = ConvBlock(c[1], c[2])
        self.conv_block4 = ConvBlock(c[2], c[3])
        self.conv_block5 = ConvBlock(c[3], c[4])
        self.conv_block6 = ConvBlock(c[4], c[5])
        self.fc1 = nn.Linear(c[5], c[5], bias=True)
        self.head = nn.Linear(c[5], n_labels)
        self.dropout = dropout
        self.embedding_size = c[5]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention, _ = self.embed_frames(x)
        return pooled, attention

    def embed_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embedding [B, 2048], uniform attention [B, T'], per-step features [B, T', 2048])``."""
        x = x.transpose(1, 2).unsqueeze(1)  # [B, 1, T, mel], the published layout
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel band
        blocks = (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4, self.conv_block5)
        for block in blocks:
            x = F.dropout(block(x), p=self.dropout, training=self.training)
        x = F.dropout(self.conv_block6(x, pool_size=(1, 1)), p=self.dropout, training=self.training)
        x = x.mean(dim=3)  # [B, C, T']
        steps = x.shape[-1]
        frames = x.transpose(1, 2)
        x = x.max(dim=2).values + x.mean(dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        x = F.dropout(F.relu(self.fc1(x)), p=0.5, training=self.training)
        return x, x.new_full((x.shape[0], steps), 1.0 / steps), frames

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, attention = self.embed(x)
        return self.head(embedding), attention
