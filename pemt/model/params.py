"""Parameter counts per component of the pretraining model, shared parts counted once."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pemt.model.factorized import FactorizedDense
from pemt.model.pretraining import AVPretrainingModel


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _private_parts(stack: nn.Module, names: tuple[str, ...]) -> dict[str, int]:
    """Parameters of factorised layers' per-modality parts, by the modality that owns them."""
    private = dict.fromkeys(names, 0)
    for module in stack.modules():
        if isinstance(module, FactorizedDense):
            for part in module.children():
                if isinstance(part, nn.ModuleList):
                    for index, owned in enumerate(part):
                        private[names[index]] += _count(owned)
    return private


def count_parameters(model: AVPretrainingModel) -> OrderedDict[str, int]:
    """Rows of components; `transformers` sums every transformer's stack and embeddings."""
    backbone = model.backbone
    rows: OrderedDict[str, int] = OrderedDict()
    rows["visual_cnn"] = _count(backbone.visual_cnn)
    rows["audio_cnn"] = _count(backbone.audio_cnn)
    rows["projections"] = _count(backbone.visual_proj) + _count(backbone.audio_proj)
    for name in backbone.names:
        rows[f"embeddings.{name}"] = _count(backbone.embeddings[name])
    if backbone.cross:
        stack = backbone.transformers["shared"]
        private = _private_parts(stack, backbone.names)
        rows["transformer.shared"] = _count(stack) - sum(private.values())
        for name, value in private.items():
            if value:
                rows[f"transformer.private.{name}"] = value
    else:
        for name in backbone.names:
            rows[f"transformer.{name}"] = _count(backbone.transformers[name])
    rows["transformers"] = _count(backbone.transformers) + _count(backbone.embeddings)
    rows["heads"] = _count(model) - _count(backbone)
    rows["total"] = _count(model)
    return rows
