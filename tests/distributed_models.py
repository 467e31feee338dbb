"""A model factory for the distributed tests: ResNet-20 whose forward fails on rank 1 while training (with gradients).

Used as ``--model distributed_models:resnet20_failing_on_rank_one`` under torchrun: evaluation and
pruning (no gradients) run normally on every rank; the first healing step raises on
rank 1 only, while rank 0 waits for it in the step's all-reduce.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from starfish.models.cifar import cifar10_resnet20


def _fail_on_rank_one(module: nn.Module, args: object, output: object) -> None:
    if torch.is_grad_enabled() and os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure in the forward pass of rank 1")


def resnet20_failing_on_rank_one(num_classes: int = 10) -> nn.Module:
    model, preprocess = cifar10_resnet20(num_classes)
    model.starfish_preprocess = preprocess
    # on the first convolution, which every pass runs: healing may stop the forward before the head
    model.conv1.register_forward_hook(_fail_on_rank_one)
    return model
