import pytest
import torch

from visionfm.data.augment import MultiCropAugmentation, sample_crop_boxes
from visionfm.modalities import MODALITIES, get_modality


@pytest.mark.parametrize("name", sorted(MODALITIES))
def test_multicrop_shapes_and_normalised_range(name):
    m = get_modality(name)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, m.channels, 48, 48), dtype=torch.uint8)
    aug = MultiCropAugmentation(m, global_size=32, local_size=16, n_local=3)
    global_views, local_views = aug(images)
    assert [tuple(v.shape) for v in global_views] == [(3, 3, 32, 32)] * 2
    assert [tuple(v.shape) for v in local_views] == [(3, 3, 16, 16)] * 3
    mean = torch.tensor(m.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.std).view(1, 3, 1, 1)
    for view in global_views + local_views:
        pixels = view * std + mean  # back to [0, 1]
        assert torch.isfinite(view).all()
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
        if m.is_grey:  # grey modalities stay grey: three identical channels
            assert torch.allclose(view[:, 0] * std[0, 0] + mean[0, 0], view[:, 1] * std[0, 1] + mean[0, 1], atol=1e-5)


def test_fov_crops_stay_inside_the_field_of_view():
    torch.manual_seed(0)
    boxes = sample_crop_boxes(2000, 100, 100, scale=(0.05, 0.3), fov=True)
    centre = boxes.mean(dim=1)
    half_diag = 0.5 * torch.linalg.norm(boxes[:, 2] - boxes[:, 0], dim=-1)
    dist = torch.linalg.norm(centre - 49.5, dim=-1)
    assert (dist + half_diag <= 50 + 1.0).all()
    plain = sample_crop_boxes(2000, 100, 100, scale=(0.05, 0.3), fov=False)
    plain_dist = torch.linalg.norm(plain.mean(dim=1) - 49.5, dim=-1)
    plain_half = 0.5 * torch.linalg.norm(plain[:, 2] - plain[:, 0], dim=-1)
    assert (plain_dist + plain_half > 51).any()  # without the constraint crops do reach the corners


def test_crop_boxes_respect_scale_and_image_bounds():
    torch.manual_seed(1)
    boxes = sample_crop_boxes(500, 60, 80, scale=(0.2, 0.5))
    w = boxes[:, 1, 0] - boxes[:, 0, 0] + 1
    h = boxes[:, 2, 1] - boxes[:, 1, 1] + 1
    assert (boxes[..., 0] >= -1e-4).all() and (boxes[..., 0] <= 79 + 1e-4).all()
    assert (boxes[..., 1] >= -1e-4).all() and (boxes[..., 1] <= 59 + 1e-4).all()
    area = w * h / (60 * 80)
    assert area.max() <= 0.5 + 1e-3 and area.min() >= 0.05  # clamping to the frame only shrinks crops


def test_grey_modality_recipe_has_no_solarisation_module():
    aug = MultiCropAugmentation("oct", global_size=32, local_size=16, n_local=1)
    names = {type(mod).__name__ for mod in aug.modules()}
    assert "RandomSolarize" not in names and "RandomGrayscale" not in names
    colour = MultiCropAugmentation("cfp", global_size=32, local_size=16, n_local=1)
    assert "RandomSolarize" in {type(mod).__name__ for mod in colour.modules()}
