"""The one place that turns a run config or a model card into the network a run trains: the classifier
(core_models.networks.build_model), inside its lesion detector (detection), or under a pretext task's head
(PretextModel). The server, the sites, the fairness tools and the adaptation all build their models here."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from core_models.networks import build_model, with_detector
from core_models.pretext import PretextModel


@dataclass(frozen=True)
class ModelSpec:
    """What a model is built from: the network's name, classes and image channels; the image size a detector's
    anchors follow; the pretext task whose head the network trains under ("" for none); `dims`: 2 for images
    (N, C, H, W), 3 for volumes (N, C, D, H, W). Detection and a pretext task exclude each other
    (core_models.config), and both are 2-D only."""

    model: str = "cnn"
    num_classes: int = 2
    in_channels: int = 1
    image_size: int = 64
    detection: bool = False
    pretext: str = ""
    dims: int = 2

    def __post_init__(self) -> None:
        if self.dims == 3 and (self.detection or self.pretext):
            part = "lesion detection" if self.detection else f"the pretext task {self.pretext!r}"
            raise ValueError(f"{part} is 2-D only: a volume run (dims = 3) trains the classifier alone")

    @classmethod
    def of_run(cls, train) -> ModelSpec:
        """From the run config's training section (its `model` already resolved)."""
        return cls(model=train.model, num_classes=train.num_classes, in_channels=train.in_channels,
                   image_size=train.image_size, detection=bool(train.detection), pretext=train.pretext,
                   dims=train.dims)

    def network(self) -> nn.Module:
        """A fresh classifier network: what scoring, auditing and a saved final_model.pt hold."""
        return build_model(self.model, self.num_classes, self.in_channels, self.dims)

    def build(self, network: nn.Module | None = None) -> nn.Module:
        """The model the run trains around `network` (a fresh one by default): under its pretext head, inside its
        detector, or the network itself. The network is held, not copied."""
        network = self.network() if network is None else network
        if self.pretext:
            return PretextModel(network, self.pretext)
        return with_detector(network, self)

    def scoring(self) -> ModelSpec:
        """The same network without a pretext head: the model a label phase, a holdout or a calibration scores."""
        return replace(self, pretext="")
