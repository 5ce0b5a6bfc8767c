"""The segmentation network's windowed image pooling."""

from __future__ import annotations

import torch

from bcseg.model import WindowedImagePooling, _window_mean, build_model


def test_window_mean_known_values():
    features = torch.arange(2 * 7 * 9, dtype=torch.float32).reshape(1, 2, 7, 9)
    means = _window_mean(features, 3)

    torch.testing.assert_close(means[..., 3, 4], features[..., 2:5, 3:6].mean((-1, -2)))
    # At the corners the window shifts inwards instead of shrinking.
    torch.testing.assert_close(means[..., 0, 0], features[..., 0:3, 0:3].mean((-1, -2)))
    torch.testing.assert_close(means[..., 6, 8], features[..., 4:7, 6:9].mean((-1, -2)))


def test_window_larger_than_input_is_global_mean():
    features = torch.randn(1, 3, 4, 5)
    means = _window_mean(features, 8)
    torch.testing.assert_close(means, features.mean((-1, -2), keepdim=True).expand_as(means))


def test_windowed_model_keeps_parameter_names():
    torch.manual_seed(0)
    plain = build_model()
    windowed = build_model(image_pooling_px=256)

    assert isinstance(windowed.net.classifier[0].convs[4], WindowedImagePooling)
    assert list(windowed.state_dict()) == list(plain.state_dict())
    windowed.load_state_dict(plain.state_dict())


def test_patch_sized_input_equals_global_pooling():
    torch.manual_seed(0)
    plain = build_model().eval()
    windowed = build_model(image_pooling_px=128).eval()
    windowed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 128, 128)

    with torch.no_grad():
        torch.testing.assert_close(windowed(images), plain(images), rtol=1e-4, atol=1e-4)
        larger = torch.randn(1, 3, 256, 256)
        assert not torch.allclose(windowed(larger), plain(larger), atol=1e-3)


def test_training_mode_pools_globally():
    torch.manual_seed(0)
    plain = build_model().train()
    windowed = build_model(image_pooling_px=64).train()
    windowed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 128, 128)
    torch.manual_seed(1)  # the same dropout masks in both
    expected = plain(images)
    torch.manual_seed(1)
    torch.testing.assert_close(windowed(images), expected)
