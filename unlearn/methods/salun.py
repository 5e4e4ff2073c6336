"""SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image Classification and
Generation (Fan, Liu, Zhang, Wong, Wei, Liu; ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

from ..data import UnlearnData
from ..models.base import Model
from ..params import ParamMask, saliency_mask
from ..train import make_loader
from .baselines import RandomLabel


@dataclass
class SalUn(RandomLabel):
    """SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (Fan et al., ICLR 2024).

    Random labelling restricted to the salient weights:

    1. Saliency mask: sum the gradient of the forgetting loss -CE over one pass of the forget set at the
       original weights, take its magnitude, keep the global top `1 - sparsity` share of entries
       (`unlearn.params.saliency_mask`; sparsity 0.5 = the reference's `with_0.5.pt`). Or load a saved mask
       from `mask_path`. The mask is saved to the run folder as `saliency_mask.safetensors` for reuse.
    2. Random labelling (`RandomLabel.phases`) on the masked model, as the reference code schedules it
       (`Classification/unlearn/RL.py`): each epoch one pass over the forget set with fresh random labels,
       then one pass over the retain set with true labels (alpha = 1, sequential: the authors' answer in
       issue #21). `mixed: true` is the reference's CIFAR-100 branch: one shuffled loader for both.
    3. Weights outside the mask never move: gradients are masked and, after every step, pinned entries and
       their optimizer state are restored, so weight decay and momentum cannot move them either (the
       reference's PR #33 fix; the paper's numbers predate it).

    Defaults suit the digits world; the CIFAR-10 recipe carries the paper's settings (10 epochs, lr 0.013).
    """

    families = ("classifier",)
    lr: float = 0.02
    sparsity: float = 0.5
    mask_path: str | None = None

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        mask = self.mask(model, data, accelerator)
        return self._fit(model, self.phases(data), accelerator, "salun", mask=mask)

    def mask(self, model: Model, data: UnlearnData, accelerator) -> ParamMask:
        """The saliency mask: loaded from `mask_path`, or computed on the forget set (and saved in the run)."""
        if self.mask_path:
            return ParamMask.load(self.mask_path)
        device = next(model.parameters()).device
        batches = (
            (images.to(device), labels.to(device))
            for images, labels in make_loader(data.forget, self.batch_size, False)
        )

        def forgetting_loss(model, batch):
            images, labels = batch
            return -F.cross_entropy(model(images), labels)

        mask = saliency_mask(model, forgetting_loss, batches, self.sparsity)
        if accelerator.project_dir and accelerator.is_main_process:
            mask.save(Path(accelerator.project_dir) / "saliency_mask.safetensors")
        return mask
