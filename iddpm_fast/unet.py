"""
The UNet noise-prediction network of improved-diffusion.

Module structure, parameter names, initialisation order and forward numerics
mirror openai/improved-diffusion exactly, so official checkpoints load with
``strict=True`` and, for a given seed, both implementations start from the
same weights and produce the same outputs.  On top of that, bad inputs raise
``ValueError`` with a readable message, and a few code paths that only crashed
in the reference (average-pool downsampling, a wide first level feeding the
output head, ``SuperResModel.get_feature_vectors``) work.
"""

import contextlib
import math
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    Dropout,
    SiLU,
    _BiasAddConv,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    normalization_silu,
    timestep_embedding,
    zero_module,
)


def _check_channels(x, expected, where):
    if x.shape[1] != expected:
        raise ValueError(
            f"{where}: expected {expected} channels in dim 1, "
            f"got {x.shape[1]} (input shape {tuple(x.shape)})"
        )


def _conv_plus(conv, h, residual):
    """``residual + conv(h)``, the add fused into the convolution's bias add
    where the convolution is one of :mod:`iddpm_fast.nn`'s."""
    if isinstance(conv, _BiasAddConv):
        return conv(h, residual=residual)
    return residual + conv(h)


class TimestepBlock(nn.Module):
    """Base class for modules whose ``forward`` takes ``(x, emb)``, where
    ``emb`` is the timestep embedding."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` conditioned on ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands ``emb`` to every child which is a
    :class:`TimestepBlock` and calls the other children with ``x`` only."""

    def forward(self, x, emb):
        for child in self:
            x = child(x, emb) if isinstance(child, TimestepBlock) else child(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv.

    :param channels: channel count of input and output.
    :param use_conv: whether to apply the convolution.
    :param dims: 1, 2 or 3 spatial dims; for 3 only the last two are scaled.
    """

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):
        _check_channels(x, self.channels, "Upsample")
        if self.dims == 3:
            depth, height, width = x.shape[2:]
            x = F.interpolate(x, (depth, height * 2, width * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by average pooling.

    :param channels: channel count of input and output.
    :param use_conv: strided convolution if True, else average pooling.
    :param dims: 1, 2 or 3 spatial dims; for 3 only the last two are reduced.
    """

    def __init__(self, channels, use_conv, dims=2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        factor = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=factor, padding=1)
        else:
            # The reference passed the stride as the dims argument here and so
            # could never build this branch.
            self.op = avg_pool_nd(dims, kernel_size=factor, stride=factor)

    def forward(self, x):
        _check_channels(x, self.channels, "Downsample")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    :param channels: input channel count.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout probability before the last conv.
    :param out_channels: output channel count (defaults to ``channels``).
    :param use_conv: when the channel count changes, use a 3x3 conv on the
        skip path instead of a 1x1 conv.
    :param use_scale_shift_norm: condition through ``norm(h) * (1 + scale) +
        shift`` (FiLM) instead of adding the embedding.
    :param dims: number of spatial dims.
    :param use_checkpoint: recompute activations in backward to save memory.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        c_out = self.out_channels

        # Construction order fixes the RNG draws of the default inits:
        # in conv, embedding linear, out conv, skip conv.
        # GroupNorm + SiLU run fused; the Identity holds the SiLU's old index
        # so that parameter names (checkpoint keys) are the original's.
        self.in_layers = nn.Sequential(
            normalization_silu(channels),
            nn.Identity(),
            conv_nd(dims, channels, c_out, 3, padding=1),
        )
        emb_width = 2 * c_out if use_scale_shift_norm else c_out
        self.emb_layers = nn.Sequential(SiLU(), linear(emb_channels, emb_width))
        self.out_layers = nn.Sequential(
            normalization_silu(c_out, scale_shift=use_scale_shift_norm),
            nn.Identity(),
            Dropout(p=dropout),
            zero_module(conv_nd(dims, c_out, c_out, 3, padding=1)),
        )

        if c_out == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel, pad = (3, 1) if use_conv else (1, 0)
            self.skip_connection = conv_nd(dims, channels, c_out, kernel, padding=pad)

    def forward(self, x, emb):
        """Map ``[N, C, ...]`` features and ``[N, emb_channels]`` embeddings
        to ``[N, out_channels, ...]``."""
        return checkpoint(
            self._forward, (x, emb), self.parameters(), self.use_checkpoint
        )

    def _forward(self, x, emb):
        h = self.in_layers(x)
        if _float32_under_fp16_autocast(emb.device.type, self.emb_layers, -1):
            with torch.autocast(emb.device.type, enabled=False):
                emb_out = self.emb_layers(emb.float()).type(h.dtype)
        else:
            emb_out = self.emb_layers(emb).type(h.dtype)
        # Broadcast [N, C] over the spatial dims of h.
        emb_out = emb_out.reshape(emb_out.shape + (1,) * (h.dim() - emb_out.dim()))
        # The layers as a list: slicing an nn.Sequential builds a new Module
        # (tens of microseconds, twice per block), which in a launch-bound
        # eager GPU step is time the host does not spend launching kernels.
        layers = list(self.out_layers)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = layers[0](h, scale, shift)
            layers = layers[1:]
        else:
            h = h + emb_out
        for layer in layers[:-1]:
            h = layer(h)
        return _conv_plus(layers[-1], h, self.skip_connection(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (any number of
    spatial dims), with a residual connection.

    Follows the attention block of Ho et al.'s original diffusion UNet.  Heads
    are carved out of the qkv projection as ``[head, (q|k|v), channel]``,
    which is the layout existing checkpoints were trained with.
    """

    def __init__(self, channels, num_heads=1, use_checkpoint=False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint

        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention()
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        if self._tokens_last(x):
            return self._forward_tokens_last(x)
        batch, chans = x.shape[:2]
        spatial = x.shape[2:]
        tokens = x.reshape(batch, chans, -1)
        length = tokens.shape[2]
        qkv = self.qkv(self.norm(tokens))
        qkv = qkv.reshape(batch * self.num_heads, -1, length)
        h = self.attention(qkv).reshape(batch, -1, length)
        return _conv_plus(self.proj_out, h, tokens).reshape(batch, chans, *spatial)

    @staticmethod
    def _tokens_last(x):
        """Channels-last images on the SDPA path: there the tokens are
        already [N, T, C] in memory, and the [N, C, T] route would copy them
        into place for each 1x1 conv and for the attention itself (on a
        2-core CPU, a bf16 training step of the 32x32 model spent ~5% of its
        time in those copies)."""
        return ops.stored_channels_last(x) and QKVAttention._use_sdpa(x)

    def _forward_tokens_last(self, x):
        """The same function on [N, T, C] tokens: the 1x1 convs as linear
        layers (the same weights), attention over views of the qkv
        projection, the result back as a channels-last image."""
        batch, chans, height, width = x.shape
        h = self.norm(x)  # stays channels-last
        tokens = h.permute(0, 2, 3, 1).reshape(batch, height * width, chans)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        h = QKVAttention.attend_tokens_last(qkv, self.num_heads)
        h = F.linear(h, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + h.reshape(batch, height, width, chans).permute(0, 3, 1, 2)


class QKVAttention(nn.Module):
    """Scaled dot-product attention on a packed ``[N, 3*C, T]`` qkv tensor;
    returns ``[N, C, T]``."""

    def forward(self, qkv):
        width = qkv.shape[1] // 3
        if self._use_sdpa(qkv):
            # The same function through scaled_dot_product_attention (flash
            # kernels, no [T, T] matrix in memory): softmax(q^T k / sqrt(d)) v
            # with the original's head split; equal within rounding. On CPUs,
            # half-precision inputs that autograd will differentiate are
            # attended in float32 (see _upcast), outside autocast, which
            # would cast them back.
            upcast = QKVAttention._upcast(qkv)
            with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
                n, c3, length = qkv.shape
                # One copy (with the cast) into [N, T, 3d]; q, k, v are views of
                # it with unit stride along d, as the flash kernels want.
                src = torch.empty((n, length, c3), dtype=torch.float32 if upcast else qkv.dtype, device=qkv.device)
                src.copy_(qkv.transpose(1, 2))
                q, k, v = src.unsqueeze(1).split(width, dim=3)  # [N, 1, T, d] each
                out = F.scaled_dot_product_attention(q, k, v)
            return out.squeeze(1).transpose(1, 2).to(qkv.dtype)
        q, k, v = torch.split(qkv, width, dim=1)
        # Scale q and k by d**-0.25 each before the product (friendlier to
        # float16 than dividing the logits by sqrt(d) afterwards).
        factor = 1 / math.sqrt(math.sqrt(width))
        logits = torch.einsum("bct,bcs->bts", q * factor, k * factor)
        weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
        return torch.einsum("bts,bcs->bct", weights, v)

    @staticmethod
    def attend_tokens_last(qkv, num_heads):
        """:meth:`forward` for qkv stored as ``[N, T, 3*C]`` (channel layout
        ``[head, (q|k|v), d]``, as the checkpoints' qkv conv produces it);
        returns ``[N, T, C]``. Always SDPA (half precision upcast as in
        :meth:`forward`)."""
        n, length, c3 = qkv.shape
        width = c3 // (3 * num_heads)
        upcast = QKVAttention._upcast(qkv)
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            src = qkv.float() if upcast else qkv
            # [N, T, head, 3, d] -> q, k, v as [N, head, T, d] views (unit stride along d).
            q, k, v = src.reshape(n, length, num_heads, 3, width).permute(3, 0, 2, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(n, length, num_heads * width).to(qkv.dtype)

    @staticmethod
    def _upcast(qkv):
        """Attend half-precision qkv in float32? On CPUs when autograd will
        differentiate it: there the flash kernel's bf16 backward is slower
        than its float32 one (64x256x32: 17.6 vs 9.4 ms forward + backward on
        a 2-core CPU). Inference (sampling) keeps bf16, whose forward is
        1.8x faster (a bf16 forward of the 32x32 c64 model: 12% faster),
        with its softmax accumulated in float32 as the original's is."""
        if qkv.is_cuda or qkv.dtype == torch.float32:
            return False
        return torch.is_grad_enabled() and qkv.requires_grad

    @staticmethod
    def _use_sdpa(qkv):
        """SDPA on CUDA, and on CPUs for float32 and half precision (measured
        on a 2-core CPU, batch 16 at 16x16: float32 1.26x the einsum forward,
        1.22x forward + backward; a bf16 training step 6% faster with SDPA in
        float32 than with the einsum in bf16; q, k, v as views of one
        transposed copy: a further 5% off an fp32 step). The original's einsum for
        float64 and whenever the reference backend is asked for, which keeps
        the original's arithmetic bit for bit."""
        if ops.requested_backend() == "reference":
            return False
        return qkv.is_cuda or qkv.dtype in (torch.float32, torch.bfloat16, torch.float16)

    @staticmethod
    def count_flops(model, _x, y):
        """``thop`` custom-op counter for the two attention matmuls, e.g.
        ``thop.profile(model, inputs=(x, t),
        custom_ops={QKVAttention: QKVAttention.count_flops})``."""
        b, c = y[0].shape[:2]
        positions = math.prod(y[0].shape[2:])
        # Two matmuls of equal cost: logits and the weighted sum of values.
        ops = 2 * b * (positions ** 2) * c
        model.total_ops += torch.DoubleTensor([ops])


def _float32_under_fp16_autocast(device_type, layers, index):
    """
    Whether to turn fp16 autocast off for a part improved-diffusion's fp16
    mode kept in float32: its ``convert_to_fp16`` halves only the torso's
    convolutions, so the time embedding, every block's ``emb_layers`` and
    the output head ran in float32. Under fp16 autocast they would run in
    half precision, and at the initial loss scale of 2^20 the output
    convolution's weight gradient (about 0.2 per element times 2^20)
    overflows fp16's 65504: the first updates were skipped and the loss
    scale settled lower than the original's. Elsewhere (no autocast, bf16,
    weights that are not float32) nothing changes. ``layers[index]`` is the
    layer whose weight's dtype decides, looked up only under fp16 autocast
    (indexing an nn.Sequential costs more than the autocast query).
    """
    return _fp16_autocast_on(device_type) and layers[index].weight.dtype == torch.float32


if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4

    def _fp16_autocast_on(device_type):
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16

else:  # older torch: per-device functions

    def _fp16_autocast_on(device_type):
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.float16
        return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16


class UNetModel(nn.Module):
    """UNet with timestep embedding, residual blocks and self-attention.

    :param in_channels: channels of the input tensor.
    :param model_channels: base channel width.
    :param out_channels: channels of the output tensor.
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) at which
        attention blocks are inserted; any container supporting ``in``.
    :param dropout: dropout probability inside residual blocks.
    :param channel_mult: width multiplier of each resolution level.
    :param conv_resample: learned convolutions for up/downsampling if True.
    :param dims: number of spatial dims (1, 2 or 3).
    :param num_classes: number of classes for class conditioning, or None.
    :param use_checkpoint: gradient checkpointing in every block.
    :param num_heads: attention heads on the way down and in the middle.
    :param num_heads_upsample: attention heads on the way up (-1: num_heads).
    :param use_scale_shift_norm: FiLM-style conditioning in residual blocks.
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if dims not in (1, 2, 3):
            raise ValueError(f"UNetModel: dims must be 1, 2 or 3, got {dims!r}")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.dims = dims

        emb_dim = model_channels * 4

        def res_block(c_in, c_out=None):
            return ResBlock(
                c_in,
                emb_dim,
                dropout,
                out_channels=c_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            )

        def attn_block(c, heads):
            return AttentionBlock(c, use_checkpoint=use_checkpoint, num_heads=heads)

        # NB: every module below is created in the reference's order, so the
        # default initialisers draw the same random numbers.
        self.time_embed = nn.Sequential(
            linear(model_channels, emb_dim),
            SiLU(),
            linear(emb_dim, emb_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        stem = conv_nd(dims, in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_chans = [model_channels]  # channels of each skip, in push order
        ch = model_channels
        ds = 1  # current downsampling factor
        last_level = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != last_level:
                down = Downsample(ch, conv_resample, dims=dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch),
            attn_block(ch, num_heads),
            res_block(ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn_block(ch, num_heads_upsample))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # The reference built this conv with `model_channels` inputs, which
        # only works when channel_mult[0] == 1; `ch` is the same number then.
        self.out = nn.Sequential(
            normalization_silu(ch),
            nn.Identity(),
            zero_module(conv_nd(dims, ch, out_channels, 3, padding=1)),
        )

    # ------------------------------------------------------------------ dtype

    def convert_to_fp16(self):
        """Cast the convolutions of the torso (input, middle and output blocks)
        to float16."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo :meth:`convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)

    @property
    def inner_dtype(self):
        """The dtype the torso runs in (that of its first parameter)."""
        return next(self.input_blocks.parameters()).dtype

    # --------------------------------------------------------------- forward

    def _validate_inputs(self, x, timesteps, y):
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not torch.is_tensor(timesteps):
            raise TypeError(
                f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}"
            )
        name = type(self).__name__
        want_ndim = self.dims + 2
        if x.dim() != want_ndim:
            raise ValueError(
                f"{name}: expected x with {want_ndim} dims [N, C, *spatial] for "
                f"dims={self.dims}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: expected x with {self.in_channels} input channels, "
                f"got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        batch = x.shape[0]
        # Length 1 broadcasts over the batch, as it did in the original.
        if timesteps.dim() != 1 or timesteps.shape[0] not in (1, batch):
            raise ValueError(
                f"{name}: timesteps must be a 1-D tensor of length N={batch} (or 1), "
                f"got shape {tuple(timesteps.shape)}"
            )
        if self.num_classes is None:
            if y is not None:
                raise ValueError(
                    f"{name}: y (class labels) was given, but this model is "
                    "unconditional (num_classes=None)"
                )
        else:
            if y is None:
                raise ValueError(
                    f"{name}: y (class labels) is missing; this model is "
                    f"class-conditional with num_classes={self.num_classes}"
                )
            if not torch.is_tensor(y) or tuple(y.shape) != (batch,):
                shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
                raise ValueError(
                    f"{name}: y must be a tensor of shape ({batch},), got {shape}"
                )
        factor = 2 ** (len(self.channel_mult) - 1)
        # With dims=3 the first spatial axis is never resampled.
        resampled = x.shape[-2:] if self.dims == 3 else x.shape[2:]
        if any(size % factor for size in resampled):
            raise ValueError(
                f"{name}: spatial size {tuple(x.shape[2:])} is not divisible by "
                f"2**(len(channel_mult)-1) = {factor} "
                f"(channel_mult={tuple(self.channel_mult)})"
            )

    def _embed(self, timesteps, y):
        if _float32_under_fp16_autocast(timesteps.device.type, self.time_embed, 0):
            with torch.autocast(timesteps.device.type, enabled=False):
                emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        else:
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps, y=None):
        """Run the model.

        :param x: ``[N, in_channels, *spatial]`` input.
        :param timesteps: ``[N]`` timesteps (may be fractional).
        :param y: ``[N]`` integer class labels; required exactly when the
            model is class-conditional.
        :return: ``[N, out_channels, *spatial]`` output.
        """
        self._validate_inputs(x, timesteps, y)
        emb = self._embed(timesteps, y)
        skips = []
        h = x.type(self.inner_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if _float32_under_fp16_autocast(x.device.type, self.out, -1):
            with torch.autocast(x.device.type, enabled=False):
                return self.out(h.float())
        return self.out(h.type(x.dtype))

    def get_feature_vectors(self, x, timesteps, y=None):
        """Run the torso and collect intermediate activations.

        Same arguments as :meth:`forward`.  Returns a dict with ``'down'``
        (list, one per input block), ``'middle'`` (the middle block output)
        and ``'up'`` (list, one per output block), all cast to ``x.dtype``.
        """
        self._validate_inputs(x, timesteps, y)
        emb = self._embed(timesteps, y)
        result = {"down": [], "up": []}
        skips = []
        h = x.type(self.inner_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
            result["down"].append(h.type(x.dtype))
        h = self.middle_block(h, emb)
        result["middle"] = h.type(x.dtype)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            result["up"].append(h.type(x.dtype))
        return result


_INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class SuperResModel(UNetModel):
    """UNet for super-resolution: the low-resolution image ``low_res`` is
    resized to the size of ``x`` and concatenated to it along channels.

    ``in_channels`` is the channel count of ``x`` (and of ``low_res``); the
    underlying UNet sees twice as many.
    """

    def __init__(self, in_channels, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    def _with_low_res(self, x, low_res):
        name = type(self).__name__
        if low_res is None:
            raise ValueError(f"{name}: the low_res keyword argument is required")
        image_chans = self.in_channels // 2
        if x.dim() != self.dims + 2:
            raise ValueError(
                f"{name}: expected x with {self.dims + 2} dims, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != image_chans:
            raise ValueError(
                f"{name}: expected x with {image_chans} input channels, "
                f"got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if low_res.dim() != x.dim() or low_res.shape[1] != image_chans:
            raise ValueError(
                f"{name}: expected low_res with {image_chans} channels and "
                f"{x.dim()} dims, got shape {tuple(low_res.shape)}"
            )
        size = tuple(x.shape[2:])
        upsampled = F.interpolate(low_res, size, mode=_INTERP_MODES[self.dims])
        return torch.cat([x, upsampled], dim=1)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        return super().forward(self._with_low_res(x, low_res), timesteps, **kwargs)

    def get_feature_vectors(self, x, timesteps, low_res=None, **kwargs):
        x = self._with_low_res(x, low_res)
        return super().get_feature_vectors(x, timesteps, **kwargs)
