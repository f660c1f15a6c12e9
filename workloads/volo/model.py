"""VOLO: Vision Outlooker (Yuan et al., arXiv:2106.13112) in MindSpore.

One file, variants as data, parameter names equal to timm's / the official sail-sg
release (``network.0.0.attn.v.weight`` ...) except where MindSpore names a
parameter differently (LayerNorm/BatchNorm ``gamma``/``beta``/``moving_*``), so
that ``convert.py`` maps checkpoints key by key.

Layout of one model (D1 at 224 px):
    stem (3 convs, stride 2) + patch projection  -> B,28,28,192   tokens (BHWC)
    network[0]  Outlooker blocks (outlook attention, stride 2)
    network[1]  Downsample (2x2 conv)            -> B,14,14,384
    + pos_embed
    network[2:] Transformer blocks
    cls token + class-attention post blocks, LayerNorm
    logits = head(cls) + 0.5 * max_tokens(aux_head(tokens))   (token labeling)

Outlook attention needs unfold/fold.  MindCV uses ``nn.Unfold``
(ExtractImagePatches, which has no CPU kernel) and a Fold that breaks in Graph
mode; here they are ``ops.unfold``/``ops.fold`` (Im2Col/Col2Im), which MindSpore
ships for Ascend, GPU and CPU, with gradients, in both modes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, TruncatedNormal, Uniform, initializer
from mindspore.nn.utils import no_init_parameters

from workloads.volo import cpu_ops

__all__ = ["VoloConfig", "VOLO", "create_model", "list_models", "model_config"]


@dataclass(frozen=True)
class VoloConfig:
    """Architecture of one VOLO variant; ``create_model`` overrides may replace any field."""

    layers: tuple[int, ...]
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 8
    stem_hidden_dim: int = 64
    mlp_ratio: float = 3.0
    downsamples: tuple[bool, ...] = (True, False, False, False)
    outlook_attention: tuple[bool, ...] = (True, False, False, False)
    outlook_kernel: int = 3
    outlook_padding: int = 1
    outlook_stride: int = 2
    pooling_scale: int = 2
    post_layers: int = 2
    qkv_bias: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    use_aux_head: bool = True
    # Eval transform of the released weights (resize to img_size / crop_pct, then center crop).
    crop_pct: float = 0.96
    mean: tuple[float, float, float] = field(default=(0.485, 0.456, 0.406))
    std: tuple[float, float, float] = field(default=(0.229, 0.224, 0.225))

    def validate(self) -> None:
        n = len(self.layers)
        for name in ("embed_dims", "num_heads", "downsamples", "outlook_attention"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"VoloConfig.{name} must have {n} entries like layers={self.layers}")
        if self.patch_size not in (4, 8, 16):
            raise ValueError(f"VoloConfig.patch_size must be 4, 8 or 16, got {self.patch_size}")
        grid = self.img_size // self.patch_size
        if self.img_size % self.patch_size or grid % self.pooling_scale:
            raise ValueError(
                f"VoloConfig.img_size={self.img_size} must be a multiple of "
                f"patch_size*pooling_scale={self.patch_size * self.pooling_scale}"
            )
        if not (self.outlook_attention[0] and self.downsamples[0]) or any(self.downsamples[1:]):
            # forward adds pos_embed after network[1]; that needs outlookers + one downsample first
            raise ValueError("VOLO expects outlook attention and the only downsample in stage 0")
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by num_heads {heads}")


_D1 = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
_D2 = dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D3 = dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D4 = dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16))
_D5 = dict(
    layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
    mlp_ratio=4.0, stem_hidden_dim=128,
)

# Names and input sizes as timm's registry; crop_pct as the released weights' eval configs.
_VARIANTS: dict[str, VoloConfig] = {
    "volo_d1_224": VoloConfig(**_D1, img_size=224, crop_pct=0.96),
    "volo_d1_384": VoloConfig(**_D1, img_size=384, crop_pct=1.0),
    "volo_d2_224": VoloConfig(**_D2, img_size=224, crop_pct=0.96),
    "volo_d2_384": VoloConfig(**_D2, img_size=384, crop_pct=1.0),
    "volo_d3_224": VoloConfig(**_D3, img_size=224, crop_pct=0.96),
    "volo_d3_448": VoloConfig(**_D3, img_size=448, crop_pct=1.0),
    "volo_d4_224": VoloConfig(**_D4, img_size=224, crop_pct=0.96),
    "volo_d4_448": VoloConfig(**_D4, img_size=448, crop_pct=1.15),
    "volo_d5_224": VoloConfig(**_D5, img_size=224, crop_pct=0.96),
    "volo_d5_448": VoloConfig(**_D5, img_size=448, crop_pct=1.15),
    "volo_d5_512": VoloConfig(**_D5, img_size=512, crop_pct=1.15),
    # For tests and the CPU quickstart (32 px digits): every block type, 1.3 M parameters at 10 classes.
    "volo_tiny": VoloConfig(
        layers=(2, 2, 2, 1), embed_dims=(64, 128, 128, 128), num_heads=(2, 4, 4, 4),
        img_size=32, patch_size=4, stem_hidden_dim=32, crop_pct=1.0,
    ),
}
# MindCV's names for the 224 px variants.
_ALIASES = {f"volo_d{i}": f"volo_d{i}_224" for i in range(1, 6)}


def _dense(in_dim: int, out_dim: int, bias: bool = True) -> nn.Dense:
    # timm initialises every Linear with trunc_normal(std=.02) and zero bias.
    return nn.Dense(in_dim, out_dim, weight_init=TruncatedNormal(0.02), bias_init="zeros", has_bias=bias)


def _on_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"


# On CPU, the norm and GELU are cpu_ops' equivalents with cheaper backward passes.
def _layer_norm(dim: int) -> nn.LayerNorm:
    # MindSpore's default epsilon is 1e-7; the reference uses torch's 1e-5.
    return cpu_ops.LayerNorm(dim, 1e-5) if _on_cpu() else nn.LayerNorm((dim,), epsilon=1e-5)


def _gelu() -> nn.GELU:
    # MindSpore defaults to the tanh approximation; torch's nn.GELU is the exact erf form.
    return cpu_ops.GELU() if _on_cpu() else nn.GELU(approximate=False)


class DropPath(nn.Cell):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.keep_prob = 1.0 - drop_prob

    def construct(self, x):
        if not self.training or self.keep_prob >= 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = ops.floor(self.keep_prob + ops.rand(shape, dtype=x.dtype))
        return x / self.keep_prob * mask


def _drop_path(p: float) -> nn.Cell:
    return DropPath(p) if p > 0.0 else nn.Identity()


class Conv2d(nn.Cell):
    """A 2-D convolution with nn.Conv2d's parameters (``weight`` OIHW, ``bias``) and torch's
    init, NCHW in and out (NHWC with ``channels_last``).

    On CPU it runs as im2col (ops.unfold) + one MatMul: MindSpore 2.10's CPU Conv2D kernel
    ran at ~0.2 GFLOP/s here, 40x slower than its MatMul. Other backends use their native
    convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, channels_last: bool = False):
        super().__init__()
        k = kernel_size
        self.kernel_size, self.stride, self.padding = k, stride, padding
        self.channels_last = channels_last
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_channels, in_channels, k, k)),
                                name="weight")
        self.has_bias = bias
        if bias:
            self.bias = Parameter(initializer(Uniform(1 / math.sqrt(in_channels * k * k)), (out_channels,)),
                                  name="bias")
        self.use_matmul = _on_cpu()
        if not self.use_matmul:
            self.conv = ops.Conv2D(out_channels, k, pad_mode="pad", pad=padding, stride=stride)

    def construct(self, x):
        if not self.use_matmul:
            if self.channels_last:
                x = x.transpose(0, 3, 1, 2)
            out = self.conv(x, self.weight)
            if self.has_bias:
                out = ops.bias_add(out, self.bias)
            return out.transpose(0, 2, 3, 1) if self.channels_last else out
        if self.channels_last:
            x = x.transpose(0, 3, 1, 2)
        b, _, height, width = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        cols = ops.unfold(x, k, 1, p, s)  # B, C_in*k*k, L in the order of weight.reshape(C_out, -1)
        out = ops.matmul(self.weight.reshape(self.weight.shape[0], -1), cols)
        if self.has_bias:
            out = out + self.bias.reshape(-1, 1)
        out = out.reshape(b, -1, (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1)
        return out.transpose(0, 2, 3, 1) if self.channels_last else out


class Mlp(nn.Cell):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = _dense(dim, hidden)
        self.act = _gelu()
        self.fc2 = _dense(hidden, dim)
        self.drop = nn.Dropout(p=drop) if drop > 0 else nn.Identity()

    def construct(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class OutlookAttention(nn.Cell):
    """Each output location attends over its k x k neighbourhood with weights predicted
    directly from the (pooled) centre token, instead of from query-key products."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1,
                 stride: int = 1, qkv_bias: bool = False, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = (dim // num_heads) ** -0.5
        self.v = _dense(dim, dim, bias=qkv_bias)
        self.attn = _dense(dim, kernel_size**4 * num_heads)
        self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = _dense(dim, dim)
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, x):
        b, height, width, c = x.shape
        k, s, heads = self.kernel_size, self.stride, self.num_heads
        h, w = (height + s - 1) // s, (width + s - 1) // s

        k2, p = k * k, self.padding
        v = self.v(x).transpose(0, 3, 1, 2)  # B,C,H,W
        v = ops.unfold(v, k, 1, p, s)  # B, C*kk, hw  (channel-major, as torch's nn.Unfold)
        v = v.reshape(b, heads, c // heads, k2, h * w).transpose(0, 1, 4, 3, 2)  # B,H,hw,kk,C/H

        # attention weights from the centre token, average-pooled to the stride
        pooled = x.reshape(b, h, s, w, s, c).mean(axis=(2, 4)) if s > 1 else x
        attn = self.attn(pooled).reshape(b, h * w, heads, k2, k2).transpose(0, 2, 1, 3, 4)
        attn = self.attn_drop(self.softmax(attn * self.scale))

        out = ops.matmul(attn, v).transpose(0, 1, 4, 3, 2).reshape(b, c * k2, h * w)
        out = ops.fold(out, ms.Tensor([height, width], ms.int32), k, 1, p, s)  # overlaps summed
        return self.proj(out.transpose(0, 2, 3, 1))


class Block(nn.Cell):
    """Pre-norm residual block: token mixer, then MLP. VOLO's Outlooker and Transformer
    blocks differ only in the mixer (outlook attention vs self-attention)."""

    def __init__(self, dim: int, mixer: nn.Cell, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = mixer
        self.drop_path = _drop_path(drop_path)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def construct(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def Outlooker(dim, kernel_size, padding, stride, num_heads, mlp_ratio, qkv_bias,  # noqa: N802
              attn_drop=0.0, drop_path=0.0) -> Block:
    mixer = OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias, attn_drop)
    return Block(dim, mixer, mlp_ratio, drop_path)


class Attention(nn.Cell):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = _dense(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = _dense(dim, dim)
        self.softmax = nn.Softmax(axis=-1)
        self.q_kt = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        b, height, width, c = x.shape
        heads, n = self.num_heads, height * width
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
        # q, k, v by one Split of the leading axis: indexing qkv[i] is a StridedSlice each,
        # ~11 ms apiece on CPU at D1's shapes. Scaling q (not q @ k^T) is the smaller multiply.
        q, k, v = ops.split(qkv.reshape(3 * b, heads, n, c // heads), b)
        attn = self.attn_drop(self.softmax(self.q_kt(q * self.scale, k)))
        out = ops.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, height, width, c)
        return self.proj(out)


def Transformer(dim, num_heads, mlp_ratio, qkv_bias, attn_drop=0.0, drop_path=0.0) -> Block:  # noqa: N802
    return Block(dim, Attention(dim, num_heads, qkv_bias, attn_drop), mlp_ratio, drop_path)


class ClassAttention(nn.Cell):
    """Only the class token queries; every token (class token included) is key and value."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kv = _dense(dim, dim * 2, bias=qkv_bias)
        self.q = _dense(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(p=attn_drop) if attn_drop > 0 else nn.Identity()
        self.proj = _dense(dim, dim)
        self.softmax = nn.Softmax(axis=-1)
        self.q_kt = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        kv = self.kv(x).reshape(b, n, 2, heads, hd).transpose(2, 0, 3, 1, 4)
        k, v = ops.split(kv.reshape(2 * b, heads, n, hd), b)  # as in Attention
        q = self.q(x[:, :1, :]).reshape(b, heads, 1, hd)
        attn = self.attn_drop(self.softmax(self.q_kt(q * self.scale, k)))
        cls_embed = ops.matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, 1, heads * hd)
        return self.proj(cls_embed)


class ClassBlock(nn.Cell):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, attn_drop=0.0):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def construct(self, x):
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.attn(self.norm1(x))
        cls_embed = cls_embed + self.mlp(self.norm2(cls_embed))
        return ops.cat((cls_embed, x[:, 1:]), axis=1)


class PatchEmbed(nn.Cell):
    """Three-conv stem at stride 2, then a non-overlapping projection to patch_size."""

    def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, patch_size: int):
        super().__init__()

        def conv_bn_relu(cin: int, kernel: int, stride: int) -> list[nn.Cell]:
            return [
                Conv2d(cin, hidden_dim, kernel, stride=stride, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(hidden_dim, eps=1e-5, momentum=0.9),
                nn.ReLU(),
            ]

        self.conv = nn.SequentialCell(
            conv_bn_relu(in_chans, 7, 2) + conv_bn_relu(hidden_dim, 3, 1) + conv_bn_relu(hidden_dim, 3, 1)
        )
        self.proj = Conv2d(hidden_dim, embed_dim, patch_size // 2, stride=patch_size // 2)

    def construct(self, x):
        return self.proj(self.conv(x))


class Downsample(nn.Cell):
    def __init__(self, in_dim: int, out_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = Conv2d(in_dim, out_dim, patch_size, stride=patch_size, channels_last=True)

    def construct(self, x):  # BHWC in and out
        return self.proj(x)


class VOLO(nn.Cell):
    """Input NCHW float32 of cfg.img_size, output (B, num_classes) logits.

    The output is class-token logits + 0.5 x the per-class max over the aux head's token
    logits in training and eval alike, as timm's forward() and MindCV do.
    """

    def __init__(self, cfg: VoloConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dims = cfg.embed_dims
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.stem_hidden_dim, dims[0], cfg.patch_size)
        grid = cfg.img_size // cfg.patch_size // cfg.pooling_scale
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, grid, grid, dims[-1])),
                                   name="pos_embed")
        self.pos_drop = nn.Dropout(p=cfg.pos_drop_rate) if cfg.pos_drop_rate > 0 else nn.Identity()

        total = sum(cfg.layers)
        network: list[nn.Cell] = []
        for i, depth in enumerate(cfg.layers):
            first = sum(cfg.layers[:i])
            if cfg.outlook_attention[i]:
                # The reference gives outlookers no stochastic depth (rate only reaches stage 2+).
                blocks = [
                    Outlooker(dims[i], cfg.outlook_kernel, cfg.outlook_padding, cfg.outlook_stride,
                              cfg.num_heads[i], cfg.mlp_ratio, cfg.qkv_bias, cfg.attn_drop_rate)
                    for _ in range(depth)
                ]
            else:
                blocks = [
                    Transformer(dims[i], cfg.num_heads[i], cfg.mlp_ratio, cfg.qkv_bias,
                                cfg.attn_drop_rate,
                                drop_path=cfg.drop_path_rate * (first + j) / max(total - 1, 1))
                    for j in range(depth)
                ]
            network.append(nn.SequentialCell(blocks))
            if cfg.downsamples[i]:
                network.append(Downsample(dims[i], dims[i + 1], cfg.pooling_scale))
        self.network = nn.CellList(network)

        self.post_network = nn.CellList([
            ClassBlock(dims[-1], cfg.num_heads[-1], cfg.mlp_ratio, cfg.qkv_bias, cfg.attn_drop_rate)
            for _ in range(cfg.post_layers)
        ])
        self.cls_token = Parameter(initializer(TruncatedNormal(0.02), (1, 1, dims[-1])), name="cls_token")
        self.norm = _layer_norm(dims[-1])
        self.head_drop = nn.Dropout(p=cfg.drop_rate) if cfg.drop_rate > 0 else nn.Identity()
        self.head = _dense(dims[-1], cfg.num_classes)
        self.use_aux_head = cfg.use_aux_head
        if cfg.use_aux_head:
            self.aux_head = _dense(dims[-1], cfg.num_classes)

    def forward_features(self, x):
        x = self.patch_embed(x).transpose(0, 2, 3, 1)  # B,C,H,W -> B,H,W,C
        for idx, block in enumerate(self.network):
            if idx == 2:  # positions are added once the outlookers and downsample are done
                x = self.pos_drop(x + self.pos_embed)
            x = block(x)
        b, _, _, c = x.shape
        x = x.reshape(b, -1, c)
        x = ops.cat((ops.broadcast_to(self.cls_token, (b, 1, c)), x), axis=1)
        for block in self.post_network:
            x = block(x)
        return self.norm(x)

    def construct(self, x):
        x = self.forward_features(x)
        out = self.head(x[:, 0])
        if self.use_aux_head:
            aux = self.aux_head(self.head_drop(x)[:, 1:])
            out = out + 0.5 * aux.max(axis=1)
        return out


def _resolve(name: str) -> str:
    canonical = _ALIASES.get(name, name)
    if canonical not in _VARIANTS:
        raise ValueError(f"unknown VOLO model {name!r}; valid names: {', '.join(list_models())}")
    return canonical


def list_models() -> list[str]:
    """Every name create_model accepts: timm's names, MindCV's aliases and volo_tiny."""
    return sorted([*_VARIANTS, *_ALIASES])


def model_config(name: str, **overrides) -> VoloConfig:
    cfg = _VARIANTS[_resolve(name)]
    unknown = set(overrides) - set(VoloConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown option(s) for {name}: {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(VoloConfig.__dataclass_fields__)}"
        )
    for key in ("layers", "embed_dims", "num_heads", "downsamples", "outlook_attention", "mean", "std"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(cfg, **overrides)


def create_model(name: str, num_classes: int = 1000, checkpoint_path: str | None = None,
                 **overrides) -> VOLO:
    """Build a VOLO variant, e.g. ``create_model("volo_d1", num_classes=1000, drop_path_rate=0.1)``.

    ``checkpoint_path`` loads a MindSpore checkpoint (from training or convert.py) strictly:
    a missing or unexpected parameter is an error.
    """
    # A checkpoint replaces every value, so skip the random init: it is the slow part of
    # building a model on the host (volo_d1 2.8 s, volo_d5 27 s, measured).
    lazy = no_init_parameters() if checkpoint_path else contextlib.nullcontext()
    with lazy:
        model = VOLO(model_config(name, num_classes=num_classes, **overrides))
    if checkpoint_path:
        params = ms.load_checkpoint(checkpoint_path)
        try:
            missing, _ = ms.load_param_into_net(model, params, strict_load=True)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(f"{checkpoint_path} does not fit {name}: {exc}") from exc
        # optimizer state (adam moments, step counters) may share the file; model keys may not be missing
        if missing:
            raise ValueError(f"{checkpoint_path} does not fit {name}: missing {', '.join(missing)}")
    return model
