"""The model as modified-backpropagation methods need it (zennit calls this canonization).

Guided backprop, deconvolution and DeepLIFT (captum) replace the backward pass of
every ``nn.ReLU`` *module*; LRP (zennit) attaches a rule to every module. The
CaseNet as trained breaks both: its ReLUs are in-place (a backward hook on an
in-place op is an error), the residual block applies a functional ``F.relu`` after
``x + body(x)`` (invisible to hooks, so guided backprop would pass negative
gradients there), torchvision's BasicBlock calls one ``nn.ReLU`` twice (captum's
DeepLIFT keeps one input per module, so reuse gives wrong multipliers), and the
addition itself is not a module (LRP needs a rule to split relevance between
the skip and the body). :func:`canonical_model` returns an eval copy that
computes the same function (checked to 1e-5 in the tests) with

* every Conv + BatchNorm pair folded into one conv (what zennit's
  ``MergeBatchNorm`` canonizer does; the registry's ``inference_model``),
  for torchvision BasicBlocks too;
* every ``nn.ReLU`` non-inplace and used once;
* residual additions as ``zennit.layer.Sum`` over ``stack([skip, body], -1)``
  followed by their own ``nn.ReLU`` (zennit's ``ResNetBasicBlockCanonizer``,
  applied to our ``_Residual`` as well).

The copy is cached per model and rebuilt when the weights change. The trained
model (and ``retrieval/model/network.py``) is left as is.
"""

from __future__ import annotations

import copy
import types
import weakref

import torch
from torch import nn

_CANON: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sum_module() -> nn.Module:
    from zennit.layer import Sum

    return Sum()


def _residual_forward(self, x):
    return self.canon_relu(self.canon_sum(torch.stack([x, self.body(x)], dim=-1)))


def _basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.canon_relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.canon_relu2(self.canon_sum(torch.stack([identity, out], dim=-1)))


def _fold_attr(mod: nn.Module, conv: str, bn: str) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    c, b = getattr(mod, conv), getattr(mod, bn)
    if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
        setattr(mod, conv, fuse_conv_bn_eval(c, b))
        setattr(mod, bn, nn.Identity())


def _weights_key(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def canonical_model(model: nn.Module) -> nn.Module:
    """An eval copy of ``model`` that hooks can explain (see the module docstring)."""
    from torchvision.models.resnet import BasicBlock

    from retrieval.explain.registry import inference_model
    from retrieval.model.network import _Residual

    if model.training:
        model = copy.deepcopy(model).eval()
    key = _weights_key(model)
    hit = _CANON.get(model)
    if hit is not None and hit[0] == key:
        hit[1].explain_reference = getattr(model, "explain_reference", None)  # set after caching
        return hit[1]
    base = inference_model(model)
    canon = copy.deepcopy(base)
    for mod in list(canon.modules()):
        if isinstance(mod, _Residual):
            mod.canon_sum, mod.canon_relu = _sum_module(), nn.ReLU()
            mod.forward = types.MethodType(_residual_forward, mod)
        elif isinstance(mod, BasicBlock):
            _fold_attr(mod, "conv1", "bn1")
            _fold_attr(mod, "conv2", "bn2")
            if mod.downsample is not None and len(mod.downsample) == 2:
                _fold_attr(mod.downsample, "0", "1")
            mod.canon_sum = _sum_module()
            mod.canon_relu1, mod.canon_relu2 = nn.ReLU(), nn.ReLU()
            mod.relu = nn.Identity()  # unused by the new forward
            mod.forward = types.MethodType(_basic_block_forward, mod)
    # fold what inference_model could not (e.g. a model without Sequential Conv+BN pairs)
    for mod in list(canon.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, name, nn.ReLU())  # a fresh, non-inplace module per position
    # a ReLU module reached twice by the forward would still be shared: make Sequentials unique
    seen: set[int] = set()
    for mod in list(canon.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                if id(child) in seen:
                    setattr(mod, name, nn.ReLU())
                seen.add(id(child))
    canon.eval()
    for p in canon.parameters():
        p.requires_grad_(False)
    _CANON[model] = (key, canon)
    return canon
