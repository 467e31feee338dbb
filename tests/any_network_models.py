"""Small networks with the layouts users bring, built from code in the tests (no weights needed)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm(self.conv(x)))


class GrayCNN(nn.Module):
    """A 1-channel CNN (MNIST-style) with two residual blocks and no preprocessing metadata."""

    def __init__(self, num_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.Sequential(ConvBlock(width), ConvBlock(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def gray_cnn(num_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return GrayCNN(num_classes)


# --- vit-pytorch layout: residual adds happen in the encoder's loop, outside every module ----------


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, Attention(dim, heads)), PreNorm(dim, FeedForward(dim, hidden))]) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class LoopViT(nn.Module):
    """A vit-pytorch style classifier: patch embedding, class token, encoder loop, linear head."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 3, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.to_patch = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.transformer = Transformer(dim, depth, heads, 2 * dim)
        self.mlp_head = nn.Linear(dim, num_classes)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.patch
        patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = self.to_patch(patches)
        return torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.transformer(self.embed(img))[:, 0])

    def reference_stream(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after every add, written out by hand (the alignment reference)."""
        x = self.embed(img)
        states = []
        for attn, ff in self.transformer.layers:
            x = attn(x) + x
            states.append(x)
            x = ff(x) + x
            states.append(x)
        return states


# --- nested dense blocks: registration order of discovered blocks is not forward order -------------


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.relu(self.conv(x))], dim=1)


class DenseStage(nn.Module):
    def __init__(self, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*[DenseLayer(channels + i * growth, growth) for i in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Transition(nn.Module):
    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(self.conv(x), 2)


class NestedDenseNet(nn.Module):
    """stem -> [stage, transition, stage, transition, stage] -> head; stages hold dense layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            DenseStage(8, 4, 2), Transition(16, 8), DenseStage(8, 4, 2), Transition(16, 8), DenseStage(8, 4, 2)
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


FORWARD_ORDER = [
    "blocks.0.block.0", "blocks.0.block.1", "blocks.1",
    "blocks.2.block.0", "blocks.2.block.1", "blocks.3",
    "blocks.4.block.0", "blocks.4.block.1",
]


class Backwards(nn.Module):
    """Blocks registered in one container but called in reverse: only hook order tells the truth."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([ConvBlock(4), ConvBlock(4), ConvBlock(4)])
        self.unused = nn.Sequential(ConvBlock(4), ConvBlock(4))  # registered, never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in reversed(self.stages):
            x = stage(x)
        return x.mean(dim=(2, 3))


def loop_vit(num_classes: int = 10) -> nn.Module:
    from starfish.models import Preprocess

    torch.manual_seed(0)
    model = LoopViT(num_classes=num_classes)
    model.starfish_preprocess = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return model


class Wrapper(nn.Module):
    """A model whose own parameter names start with 'model.' (must not lose that prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = GrayCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def synthetic_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random 16x16 images (coarse structure plus noise): a task a small encoder can learn."""
    g = torch.Generator().manual_seed(seed)
    coarse = nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear")
    return coarse + 0.3 * torch.randn(n, 3, 16, 16, generator=g)


def synthetic_label(x: torch.Tensor) -> torch.Tensor:
    """Four classes from two visible properties: left/right brightness and the first channel's sign."""
    return (x[:, :, :8].mean((1, 2, 3)) > x[:, :, 8:].mean((1, 2, 3))).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()


def trained_loop_vit(steps: int = 300) -> nn.Module:
    """A LoopViT trained on the synthetic task, so its decisions mean something (eval mode)."""
    torch.manual_seed(0)
    dense = LoopViT()
    train = synthetic_images(2048, 3)
    opt = torch.optim.Adam(dense.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, 2048, (64,))
        loss = nn.functional.cross_entropy(dense(train[idx]), synthetic_label(train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dense.eval()
