"""Small networks the GTMM is built from: frame encoder/decoder, action embedding, Gaussian heads.

Sizes follow the paper's appendix B in spirit (Gemici et al. 2017): a few stride-2 4x4 convolutions down to a
~7x7 (28px frames) or 4x4 (64px frames) map, and their transposes back up. Every module here works on a flat
batch of frames (N = B*T) so the model can encode and decode all time steps in one call.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gtmm.cli import UserError


def _num_downsamples(height: int, width: int) -> int:
    """Halve the frame until it is at most 7 pixels on a side (28 -> 14 -> 7; 64 -> 32 -> 16 -> 8 -> 4)."""
    n = 0
    while height > 7 and height % 2 == 0 and width % 2 == 0:
        height, width, n = height // 2, width // 2, n + 1
    return n


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there oneDNN's bf16 convolutions are
    ~2x faster than fp32 ones; elsewhere bf16 is emulated and slower."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _bf16_region(on: bool, device_type: str) -> contextlib.AbstractContextManager:
    """A bf16 autocast region when `on`; otherwise nothing (not a disabled region: that would switch off an
    enclosing autocast, e.g. `--precision bf16`'s)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _check_frame_size(height: int, width: int) -> None:
    if _num_downsamples(height, width) == 0:
        raise UserError(f"frame size {height}x{width}: expected even sides larger than 7 (e.g. 28x28 or 64x64)")


class Encoder(nn.Module):
    """e_t = enc(x_t): conv stack, stride 2, channel count doubling, then a linear layer to `embed_dim`."""

    def __init__(self, obs_shape: tuple[int, int, int], embed_dim: int, channels: int = 32) -> None:
        super().__init__()
        height, width, in_ch = obs_shape
        _check_frame_size(height, width)
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(_num_downsamples(height, width)):
            out_ch = channels * 2**i
            layers += [nn.Conv2d(ch, out_ch, 4, stride=2, padding=1), nn.GELU()]
            ch, height, width = out_ch, height // 2, width // 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(ch * height * width, embed_dim)
        self.embed_dim = embed_dim
        self.bf16 = False  # `GTMM.set_conv_bf16`: the layers in bf16 (autocast), the output in fp32

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (N, C, H, W) float in [0, 1] -> (N, embed_dim)."""
        with _bf16_region(self.bf16, frames.device.type):
            if frames.device.type == "cpu":
                embed = self._forward_cpu(frames)  # (N, E)
            else:
                embed = F.gelu(self.fc(self.convs(frames - 0.5).flatten(1)))  # centre the pixels; (N, E)
        return embed.float() if self.bf16 else embed

    def _forward_cpu(self, frames: torch.Tensor) -> torch.Tensor:
        # oneDNN's convolution backward is ~2.5x faster when the maps and their gradients are all channels-last
        # (mixed layouts fall back to slow reorders: a GELU backward of a contiguous gradient on a channels-last
        # map costs 8x one on matching layouts). So run the stack channels-last and flatten in (H, W, C) order,
        # which is free for such a map, with the fc's columns reordered to match: the same sums. A 1-channel
        # frame (and the first conv's 1-channel weight) is both layouts at once, so oneDNN returns that conv's
        # output contiguous and would keep the stack there: each conv's output is made channels-last (a copy
        # for the first only; mnist_cpu's encoder forward + backward 55 -> 44 ms).
        features = frames.contiguous(memory_format=torch.channels_last) - 0.5
        for layer in self.convs:
            features = layer(features)
            if isinstance(layer, nn.Conv2d):
                features = features.contiguous(memory_format=torch.channels_last)  # (N, C', H', W')
        N, C, H, W = features.shape
        weight = self.fc.weight.view(-1, C, H, W).permute(0, 2, 3, 1).reshape(self.embed_dim, -1)
        return F.gelu(F.linear(features.permute(0, 2, 3, 1).reshape(N, -1), weight, self.fc.bias))  # (N, E)


class Decoder(nn.Module):
    """Observation model p(x_t | z_t): linear to a small map, then transposed convs back to (C, H, W) logits."""

    def __init__(self, obs_shape: tuple[int, int, int], z_dim: int, channels: int = 32) -> None:
        super().__init__()
        height, width, out_ch = obs_shape
        _check_frame_size(height, width)
        n = _num_downsamples(height, width)
        self.start_ch = channels * 2 ** (n - 1)
        self.start_hw = (height // 2**n, width // 2**n)
        self.fc = nn.Linear(z_dim, self.start_ch * self.start_hw[0] * self.start_hw[1])
        layers: list[nn.Module] = []
        ch = self.start_ch
        for i in reversed(range(n)):
            nxt = out_ch if i == 0 else channels * 2 ** (i - 1)
            layers.append(nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.GELU())
            ch = nxt
        self.deconvs = nn.Sequential(*layers)
        self.bf16 = False  # `GTMM.set_conv_bf16`: the layers in bf16 (autocast), the logits in fp32

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, Z) -> pixel logits (N, C, H, W)."""
        if self.bf16:
            with _bf16_region(True, z.device.type):
                features = F.gelu(self.fc(z)).view(-1, self.start_ch, *self.start_hw)  # (N, C', H', W')
                if z.device.type == "cpu":
                    # oneDNN's bf16 transposed convolutions (AMX) are fastest channels-last, the last one included
                    # (mnist_cpu: forward + backward 56 ms in fp32 with ATen's kernel for the last layer, 35-39 here)
                    features = features.contiguous(memory_format=torch.channels_last)
                return self.deconvs(features).float()  # (N, C, H, W)
        features = F.gelu(self.fc(z)).view(-1, self.start_ch, *self.start_hw)  # (N, C', H', W')
        *hidden, last = self.deconvs
        for layer in hidden:
            features = layer(features)
        if (features.device.type == "cpu" and last.out_channels <= 3 and not torch.is_autocast_enabled("cpu")
                and features.dtype == last.weight.dtype):
            # On the CPU, oneDNN's transposed convolution to a few image channels is the slowest layer of the model
            # (mnist_cpu: 31 ms forward + backward for 16 -> 1 channels); ATen's own im2col kernel computes the same
            # sums in half the time (measured for 1-3 output channels; from 4 on oneDNN wins, so it keeps them).
            # That kernel does not autocast: mixed precision keeps the module.
            return torch.ops.aten.slow_conv_transpose2d(features, last.weight, list(last.kernel_size), last.bias,
                                                        list(last.stride), list(last.padding),
                                                        list(last.output_padding), list(last.dilation))
        return last(features)  # (N, C, H, W)


class ActionEmbedding(nn.Module):
    """a_{t-1} as a one-hot vector with one extra "no action" slot (index 0) for episode starts and action-free tasks.

    A one-hot input keeps the action exactly recoverable by the LSTM, which is what path integration needs.
    """

    def __init__(self, num_actions: int) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.dim = num_actions + 1

    def forward(self, prev_action: torch.Tensor) -> torch.Tensor:
        """prev_action (...,) int64 in [-1, A) -> (..., A + 1) float."""
        return F.one_hot(prev_action + 1, self.dim).float()


class GaussianHead(nn.Module):
    """An MLP giving a diagonal Gaussian (mean, std) over z: the prior (eq. 2) and posterior (eq. 3) networks."""

    def __init__(self, in_dim: int, hidden_dim: int, z_dim: int, min_std: float = 0.05, skip_dim: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 2 * z_dim))
        self.min_std = min_std
        # skip_dim > 0: the last skip_dim inputs (a memory read) also reach the output through one linear map, so a
        # head can copy a read latent exactly, even one far outside what its GELU layer saw in training (zero at
        # first: the head starts as the plain MLP)
        self.skip = nn.Linear(skip_dim, 2 * z_dim, bias=False) if skip_dim else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in_dim) -> mean (B, Z), std (B, Z). A floor on std keeps the KL finite early in training."""
        out = self.net(x)
        if self.skip is not None:
            out = out + self.skip(x[..., x.shape[-1] - self.skip.in_features:])
        return self.split(out)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output (..., 2Z) -> mean, std (..., Z) each (the model's fast path runs the layers
        itself, fused with others, and calls this on their output)."""
        mean, raw_std = out.chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.min_std


def outlier_kl(q_mean: torch.Tensor, q_std: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor,
               outlier: float) -> torch.Tensor:
    """KL(q || p) for the robust prior p = (1 - eps) N(p_mean, p_std) + eps N(0, I), eps = ``outlier``, through
    the variational upper bound of a KL to a mixture (Hershey & Olsen 2007; Jensen over the components):

        KL(q || p) <= -log[(1 - eps) exp(-KL(q || N(p_mean, p_std))) + eps exp(-KL(q || N(0, I)))]

    so the loss stays an ELBO. A confident prior that is wrong pays at most ~ -log eps + KL(q || N(0, I)) instead
    of without bound; a right one pays -log(1 - eps) more. ``outlier`` = 0: the plain ``gaussian_kl``. (..., Z) ->
    (...)"""
    kl_main = gaussian_kl(q_mean, q_std, p_mean, p_std)
    if outlier <= 0.0:
        return kl_main
    kl_broad = gaussian_kl(q_mean, q_std, torch.zeros_like(q_mean), torch.ones_like(q_std))
    return -torch.logaddexp(math.log1p(-outlier) - kl_main, math.log(outlier) - kl_broad)


def gaussian_kl(q_mean: torch.Tensor, q_std: torch.Tensor, p_mean: torch.Tensor, p_std: torch.Tensor) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last axis: (..., Z) -> (...)."""
    var_ratio = (q_std / p_std).pow(2)
    mean_term = ((q_mean - p_mean) / p_std).pow(2)
    return 0.5 * (var_ratio + mean_term - 1.0 - var_ratio.log()).sum(-1)
