"""Small models of every family the IR tests cover: user classes, attention, Hugging Face configs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CatNet(nn.Module):
    """``torch.cat`` skips, ``nn.ReLU(inplace=True)``, ``x.relu_()``, ``out += shortcut``, transpose, mean pooling,
    a concat with the raw input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 4)
        self.act = nn.ReLU(inplace=True)
        self.c, self.d = nn.Linear(12, 12), nn.Linear(12, 10)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 6)
        h = torch.cat([self.act(self.a(x)), self.b(x)], -1)
        out = self.c(h)
        out += h
        out = out.relu_()
        y = self.d(out).transpose(1, 2).mean(-1)  # (B, 10)
        return self.head(torch.cat([y, x.mean(1)], -1))


class TorchvisionBlock(nn.Module):
    """A torchvision-style ResNet basic block (written here: torchvision does not load with the CPU torch):
    ``nn.ReLU(inplace=True)``, ``out += identity`` on the second BatchNorm's output, a 1x1 conv + BN downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    """Stem conv + BN + in-place ReLU + max pool, two basic blocks (the second strided, with a downsample),
    adaptive average pool, ``torch.flatten``, a Linear head: the shape of torchvision's ``resnet18``, tiny."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(TorchvisionBlock(4, 4))
        self.layer2 = nn.Sequential(TorchvisionBlock(4, 6, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, classes)

    def forward(self, x):  # (B, 3, 8, 8)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvLast(nn.Module):
    """Convolutions, a permute to channels-last and a reshape into a Linear (pattern [rep HW, unit C])."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1)
        self.fc, self.out = nn.Linear(5 * 4 * 4, 6), nn.Linear(6, 3)

    def forward(self, x):  # (B, 2, 4, 4)
        h = F.relu(self.bn(self.c1(x)), inplace=True)
        h = self.c2(h).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.out(torch.tanh(self.fc(h)))


class MHANet(nn.Module):
    """A post-LN transformer block on ``nn.MultiheadAttention`` (packed in_proj q | k | v), CLS pooling."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.emb = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 24), nn.Linear(24, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):  # (B, T, 5)
        h = self.emb(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        h = self.ln1(h + a)
        h = self.ln2(h + self.ff2(F.gelu(self.ff1(h))))
        return self.out(h[:, 0])


class EncoderNet(nn.Module):
    """``nn.TransformerEncoder`` (two layers), mean pooling."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


class HandAttention(nn.Module):
    """Hand-written attention: packed qkv, reshape / permute / unbind, matmul, softmax."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class SplitAttention(nn.Module):
    """Hand-written attention with separate q / k / v projections and ``torch.matmul`` / ``F.softmax``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, t, c = x.shape
        hd = c // self.heads
        q = self.q(x).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, hd).transpose(1, 2)
        att = F.softmax(torch.matmul(q, k.transpose(2, 3)) / hd**0.5, dim=-1)
        return self.o(torch.matmul(att, v).transpose(1, 2).contiguous().view(b, t, c))


class HandViT(nn.Module):
    """A pre-LN ViT-like model: patch conv, CLS token and position embedding parameters, hand-written attention
    blocks with a layer-scale gamma, GELU MLPs, final LayerNorm, CLS-token head."""

    def __init__(self, d: int = 16, heads: int = 4, attention: type = HandAttention):
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.ln1, blk.attn, blk.ln2 = nn.LayerNorm(d), attention(d, heads), nn.LayerNorm(d)
            blk.fc1, blk.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            blk.gamma = nn.Parameter(torch.ones(d))
            self.blocks.append(blk)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):  # (B, 1, 8, 8)
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for blk in self.blocks:
            h = h + blk.gamma * blk.attn(blk.ln1(h))
            h = h + blk.fc2(F.gelu(blk.fc1(blk.ln2(h))))
        return self.head(self.norm(h)[:, 0])


class UserRMSNorm(nn.Module):
    """A user RMSNorm class (its own module: wrappable)."""

    def __init__(self, d: int):
        super().__init__()
        self.scale, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return self.scale * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps)


class GatedRMSNet(nn.Module):
    """Embedding, ``nn.RMSNorm`` called twice, a SwiGLU FFN (gate and up share neurons), a user RMSNorm, mean
    pooling."""

    def __init__(self):
        super().__init__()
        self.emb, self.n1, self.n2 = nn.Embedding(20, 12), nn.RMSNorm(12), UserRMSNorm(12)
        self.gate, self.up = nn.Linear(12, 16, bias=False), nn.Linear(12, 16, bias=False)
        self.down, self.out = nn.Linear(16, 12, bias=False), nn.Linear(12, 5)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(F.silu(self.gate(self.n1(h))) * self.up(self.n1(h)))
        return self.out(self.n2(h).mean(1))


def hf_models() -> dict:
    """Tiny Hugging Face models (factories and example inputs), or {} without transformers."""
    try:
        import transformers as tf
    except ImportError:  # pragma: no cover - transformers is in the test environment
        return {}
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    pix = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def bert():
        cfg = tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=100,
            max_position_embeddings=16, num_labels=3,
        )  # fmt: skip
        return tf.BertForSequenceClassification(cfg)

    def vit():
        cfg = tf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
            patch_size=4, num_channels=1, num_labels=3,
        )  # fmt: skip
        return tf.ViTForImageClassification(cfg)

    def gpt2():
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16, use_cache=False,
                            bos_token_id=0, eos_token_id=0)  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)

    def llama():
        cfg = tf.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=100, use_cache=False,
        )  # fmt: skip
        return tf.LlamaForCausalLM(cfg)

    return {"bert": (bert, (ids,)), "vit": (vit, (pix,)), "gpt2": (gpt2, (ids,)), "llama": (llama, (ids,))}


def register_test_adapters() -> None:
    """The user attention classes above hard-code their head count: adapters scale it with the fused width."""
    from pyfusion.fuse.builder import register_adapter

    @register_adapter("HandAttention")
    def _hand(mod, path, original):
        mod.heads = original.heads * mod.proj.in_features // original.proj.in_features

    @register_adapter("SplitAttention")
    def _split(mod, path, original):
        mod.heads = original.heads * mod.o.in_features // original.o.in_features
