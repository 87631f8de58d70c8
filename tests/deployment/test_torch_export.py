"""What ``torch.export`` of the detector refuses, with messages that say
what to change. The exported program itself is checked against eager in
``test_export_parity.py``."""
import pytest
import torch

from ddetr_plugin.deployment import example_images, export_detector


def test_export_refuses_training_mode_a_batch_of_one_and_small_sides(
        toy, compiled_op):
    model = toy.build_model('plain')
    with pytest.raises(ValueError, match='at least 2 images'):
        export_detector(model, example_images(96, 80), dynamic=True)
    # The limit of the dynamic axes, named before torch.export's own error.
    with pytest.raises(ValueError, match='example width is 64'):
        export_detector(model, example_images(96, 64, 2), dynamic=True)
    with pytest.raises(RuntimeError, match='eval mode'):
        export_detector(model.train(), example_images(64, 64))


class DataDependentBackbone(torch.nn.Module):
    """A backbone whose Python control flow reads tensor values."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        if images.mean() > 0:
            images = images * 2
        return self.backbone(images)


def test_a_backbone_that_cannot_export_is_named(toy, compiled_op):
    model = toy.build_model('plain')
    model.backbone = DataDependentBackbone(model.backbone)
    with pytest.raises(
            RuntimeError,
            match='backbone DataDependentBackbone cannot be '
            'traced by torch.export'):
        export_detector(model, example_images(96, 96))
