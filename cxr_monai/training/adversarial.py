"""Source-adversarial training (DANN, Ganin & Lempitsky 2015): the trunk unlearns the image's source.

A small classifier, the *adversary*, predicts each training item's source (``fold_items(...,
with_source=True)``: an index into :func:`~cxr_monai.training.datalists.datalist_sources`) from the pooled
trunk features, the input of the paper's head, through a gradient-reversal layer. One training step
minimises ``CE(class) + CE(source)``, where the reversal hands the trunk ``-lambda_p`` times the source
loss's gradient: the adversary learns to tell the sources apart, the trunk learns features it cannot tell
them apart by, the head learns the class as before.

``lambda_p = lambda * (2 / (1 + exp(-10 p)) - 1)`` with ``p`` the fraction of training done (the DANN
ramp): 0 at the first step, so the adversary learns before the trunk is pushed, and about ``lambda``
from mid-training on. ``lambda`` is the bundle's ``source_adversarial_weight`` (``cxr-monai train
--source-adversarial``). The reversal's coefficient, not a weight on the source loss, carries ``lambda_p``,
so the adversary trains at full strength throughout; for the trunk the two are the same thing.

The adversary is a training-only module outside ``network_def``: ``models/model.pt`` and inference stay
the plain classifier. With ``source_adversarial_weight`` 0 nothing here runs and training is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys
from torch import nn

from cxr_monai.data import load_datalist
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.networks import HEAD_HIDDEN_UNITS
from cxr_monai.training.datalists import datalist_sources

#: Steepness of the DANN ramp of the reversal coefficient (Ganin & Lempitsky 2015, section 5.2.2).
RAMP_STEEPNESS = 10.0
#: The key of the source index in a training batch.
SOURCE_KEY = "source"


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-coefficient``. Hand-written: neither torch
    nor MONAI ships a gradient-reversal layer, and it is four lines."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-coefficient``."""
    out: torch.Tensor = _ReverseGradient.apply(x, coefficient)
    return out


def ramped_weight(weight: float, progress: float) -> float:
    """The DANN ramp ``weight * (2 / (1 + exp(-10 p)) - 1)``, ``p = progress`` clipped to [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(weight) * (2.0 / (1.0 + math.exp(-RAMP_STEEPNESS * p)) - 1.0)


def _plain(network: nn.Module) -> nn.Module:
    """The classifier inside a DistributedDataParallel wrapper (multi_gpu_train.json), else itself."""
    module = getattr(network, "module", network)
    return module if isinstance(module, nn.Module) else network


def _head(network: nn.Module) -> nn.Module:
    head = getattr(_plain(network), "head", None)
    if not isinstance(head, nn.Module):
        raise BundleError(
            f"source_adversarial_weight > 0 needs a network with a 'head' module (the pooled trunk features "
            f"are its input); {type(_plain(network)).__name__} has none"
        )
    return head


def _check_weight(weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise BundleError(f"source_adversarial_weight must be a number >= 0, got {weight!r}")
    if weight < 0:
        raise BundleError(f"source_adversarial_weight must be >= 0 (0: off), got {weight}")
    return float(weight)


def build_adversary(weight: Any, network: nn.Module, datalist: str, device: Any = "cpu") -> nn.Module | None:
    """The source classifier ``Linear(F, 64) -> ReLU -> Linear(64, S)`` on the pooled trunk features
    (F = the ``in_features`` of the head's first ``Linear``, S = the datalist's sources), on ``device``;
    None when ``weight`` is 0 (off: no module, no random numbers drawn). Under torch.distributed it is
    wrapped in DistributedDataParallel, so every rank keeps the same adversary.

    Raises BundleError for a negative or non-numeric weight or a network without the paper's head,
    DatasetError when the datalist has fewer than two sources.
    """
    if _check_weight(weight) == 0.0:
        return None
    linear = next((m for m in _head(network).modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise BundleError("source_adversarial_weight > 0 needs a head with a Linear layer (its input: F)")
    sources = datalist_sources(load_datalist(datalist))
    if len(sources) < 2:
        raise DatasetError(
            f"source_adversarial_weight > 0 needs a datalist with two or more sources; {datalist} has "
            f"{len(sources)} ({', '.join(sources)})"
        )
    hidden = HEAD_HIDDEN_UNITS
    adversary: nn.Module = nn.Sequential(
        nn.Linear(linear.in_features, hidden), nn.ReLU(), nn.Linear(hidden, len(sources))
    ).to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device_ids = [device] if torch.device(device).type == "cuda" else None
        adversary = nn.parallel.DistributedDataParallel(adversary, device_ids=device_ids)
    return adversary


class SourceAdversarialIteration:
    """A ``SupervisedTrainer`` ``iteration_update``: MONAI's training step plus the source adversary.

    Per batch (``image`` (B, 3, H, W), ``label`` (B,), ``source`` (B,) int): forward the network with a
    hook on its head catching the trunk output, class loss = the trainer's ``loss_function``, source loss
    = cross-entropy of ``adversary(reverse(pooled features, lambda_p))``, one backward of their sum, one
    optimizer step (the optimizer holds the network's and the adversary's parameters). The engine output
    is MONAI's (``image``, ``label``, ``pred``, ``loss`` = the class loss, so ``train_loss`` and
    ``train_accuracy`` keep their meaning) plus ``source_loss`` and ``source_weight`` (lambda_p).
    MONAI's iteration events fire as in the default step. AMP and gradient accumulation are not supported
    (the bundle uses neither): BundleError.
    """

    def __init__(self, adversary: nn.Module, weight: float) -> None:
        self.adversary = adversary
        self.weight = _check_weight(weight)

    def progress(self, engine: SupervisedTrainer) -> float:
        """Fraction of the run's iterations done before this one, in [0, 1)."""
        total = (engine.state.max_epochs or 1) * (engine.state.epoch_length or 1)
        return (engine.state.iteration - 1) / total

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if engine.amp or engine.accumulation_steps > 1:
            raise BundleError("source_adversarial_weight > 0 does not support amp or gradient accumulation")
        if SOURCE_KEY not in batchdata:
            raise DatasetError(
                "source_adversarial_weight > 0 needs training items with a 'source' index "
                "(fold_items(..., with_source=True))"
            )
        inputs, targets = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )[:2]
        sources = torch.as_tensor(batchdata[SOURCE_KEY]).to(engine.state.device, dtype=torch.long)
        lambda_p = ramped_weight(self.weight, self.progress(engine))
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets}
        engine.network.train()
        self.adversary.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        captured: list[torch.Tensor] = []
        hook = _head(engine.network).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            engine.state.output[CommonKeys.PRED] = engine.inferer(inputs, engine.network)
        finally:
            hook.remove()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        class_loss = engine.loss_function(engine.state.output[CommonKeys.PRED], targets).mean()
        features = captured[0]
        pooled = features.mean(dim=(2, 3)) if features.ndim == 4 else features.flatten(1)
        source_logits = self.adversary(reverse_gradient(pooled, lambda_p))
        source_loss = nn.functional.cross_entropy(source_logits, sources)
        engine.state.output[CommonKeys.LOSS] = class_loss
        engine.state.output["source_loss"] = source_loss.detach()
        engine.state.output["source_weight"] = lambda_p
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (class_loss + source_loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
