"""Every kind of classifier head builds on every Table-1 teacher and on the student, from its tap shapes."""

import pytest
import torch
from helpers import model_and_images

from heads import MHKDHead, heads_for, mhkd_heads_for, tofd_aux_for
from heads.mhkd import paddings
from models import build_model

TABLE1 = ["res14", "res20", "res32", "res56", "res110", "res18", "res34", "vgg11", "wrn_28_2", "res8"]
# TOFD: the channel chain of each auxiliary classifier, from its tap to the last tap (BASELINES.md).
CIFAR_RESNET_CHAINS = [[16, 32, 64], [32, 64]]
AUX_CHAINS = {
    **dict.fromkeys(["res8", "res14", "res20", "res32", "res56", "res110"], CIFAR_RESNET_CHAINS),
    **dict.fromkeys(["res18", "res34"], [[64, 128, 256, 512], [128, 256, 512], [256, 512]]),
    "vgg11": [[64, 128, 256, 512], [128, 256, 512], [256, 512]],
    "wrn_28_2": [[32, 64, 128], [64, 128]],
}


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", TABLE1)
def test_every_head_kind_builds_and_classifies(name):
    model, x = model_and_images(name)
    with torch.no_grad():
        taps = model.forward_features(x).taps
        shapes = model.tap_shapes()

        linear = heads_for(model, 10)
        assert [tuple(out.shape) for out in linear(taps)] == [(2, 10)] * len(taps)

        mhkd = mhkd_heads_for(model, 10).eval()
        assert mhkd.tap_names == model.tap_names[:2]
        assert [tuple(out.shape) for out in mhkd(taps)] == [(2, 10)] * 2
        for tap, shape in zip(taps, shapes, strict=True):  # the small-map rule, on every tap
            assert MHKDHead(shape, 10).eval()(tap).shape == (2, 10)

        aux = tofd_aux_for(model, 10).eval()
        assert aux.tap_names == model.tap_names[:-1]
        logits, pooled = aux(taps)
        assert [tuple(z.shape) for z in logits] == [(2, 10)] * (len(taps) - 1)
        last_channels, last_h, last_w = shapes[-1]
        assert [tuple(f.shape) for f in pooled] == [(2, last_channels)] * (len(taps) - 1)
        for classifier, chain, tap in zip(aux.classifiers, AUX_CHAINS[name], taps[:-1], strict=True):
            assert [block[-2].num_features for block in classifier.blocks] == chain[1:]
            assert classifier.blocks(tap).shape[1:] == (last_channels, last_h, last_w)  # carried to the last tap
        assert len(tofd_aux_for(model, 10, count=1).classifiers) == 1


def test_parameter_counts_on_a_cifar_resnet():
    """ResNet-110, 100 classes, counted by hand from the architectures of BASELINES.md and SPEC.md."""
    model = build_model("res110", 100)

    def sepconv(c_in, c_out):  # two depthwise 3x3, two pointwise, two BN (weight and bias)
        return 2 * 9 * c_in + c_in * c_in + c_in * c_out + 2 * c_in + 2 * c_out

    assert [num_params(a) for a in tofd_aux_for(model, 100).classifiers] == [
        sepconv(16, 32) + sepconv(32, 64) + 64 * 100 + 100, sepconv(32, 64) + 64 * 100 + 100]
    assert [num_params(a) for a in tofd_aux_for(model, 100).classifiers] == [11_492, 10_340]

    def mhkd(c_in):  # conv 3x3 to 256, BN, conv 3x3 256→256, BN, Linear(256, 256), Linear(256, classes)
        return 9 * c_in * 256 + 512 + 9 * 256 * 256 + 512 + 256 * 256 + 256 + 256 * 100 + 100

    assert [num_params(h) for h in mhkd_heads_for(model, 100).heads] == [mhkd(16), mhkd(32)] == [719_204, 756_068]
    assert [num_params(h) for h in heads_for(model, 100).heads] == [1_638_500, 819_300, 409_700]


@pytest.mark.parametrize("side,expected", [(32, (0, 0)), (5, (0, 0)), (4, (1, 0)), (3, (1, 0)), (2, (1, 1)),
                                           (1, (1, 1))])
def test_mhkd_small_map_rule(side, expected):
    assert paddings(side, side) == expected
    head = MHKDHead((8, side, side), 10)
    assert [conv.padding for conv in (head.features[0], head.features[3])] == [(p, p) for p in expected]


def test_tofd_aux_count_is_checked():
    model = build_model("res8", 10)
    with pytest.raises(ValueError, match="at most 2"):
        tofd_aux_for(model, 10, count=3)
