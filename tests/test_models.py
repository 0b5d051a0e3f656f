"""The model registry: builds, parameter counts, taps, and the TapModel contract."""

import pytest
import torch
from foreign_layouts import parameter_count, repdistiller_shapes
from helpers import model_and_images

from models import MODEL_NAMES, REPDISTILLER_NAMES, TapModel, build_model

# Exact parameter counts for 10 and 100 classes. The CIFAR ResNets have projection shortcuts, as in the DIH
# authors' code (commit 2c5f2b1) and RepDistiller: res8 83,892 and res110 1,736,564 with 100 classes there too.
# Published (CIFAR-10) figures they round to:
# ResNet-20/32/44/56/110 0.27M/0.46M/0.66M/0.86M/1.7M (He et al., 2016); ResNet-18/34 11.2M/21.3M;
# VGG-11-BN 9.2M; WRN-16-2/28-2/40-2 0.69M/1.47M/2.24M (Zagoruyko & Komodakis, 2016).
PARAMS = {
    "res8": (78_042, 83_892),
    "res14": (175_258, 181_108),
    "res20": (272_474, 278_324),
    "res32": (466_906, 472_756),
    "res44": (661_338, 667_188),
    "res56": (855_770, 861_620),
    "res110": (1_730_714, 1_736_564),
    # RepDistiller's resnet8x4, resnet32x4, vgg8 (vgg8_bn), vgg13 (vgg13_bn) and wrn_40_1: the counts its model
    # definitions give (tests/foreign_layouts.py; checked below, as for every model the two registries share).
    "res8x4": (1_210_410, 1_233_540),
    "res32x4": (7_410_730, 7_433_860),
    "res18": (11_173_962, 11_220_132),
    "res34": (21_282_122, 21_328_292),
    "res50": (23_520_842, 23_705_252),
    "vgg11": (9_228_362, 9_274_532),
    "vgg8": (3_918_858, 3_965_028),
    "vgg13": (9_416_010, 9_462_180),
    "wrn_16_2": (691_674, 703_284),
    "wrn_28_2": (1_467_610, 1_479_220),
    "wrn_40_1": (563_930, 569_780),
    "wrn_40_2": (2_243_546, 2_255_156),
    # With res50 above: RepDistiller's ResNet50, MobileNetV2 (mobile_half), ShuffleV1 and ShuffleV2, the models of
    # its cross-architecture table; again the counts its definitions give (its README and code state none).
    "mobilenetv2": (697_546, 812_836),
    "shufflev1": (862_768, 949_258),
    "shufflev2": (1_263_278, 1_355_528),
    # torchvision's constructors with these class counts (its 1000-class resnet18 has 11,689,512)
    "resnet18": (11_181_642, 11_227_812),
    "resnet34": (21_289_802, 21_335_972),
    "resnet50": (23_528_522, 23_712_932),
    "mobilenet_v2": (2_236_682, 2_351_972),
}

CIFAR_RESNET_TAPS = {"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}
WRN_2_TAPS = {"group1": (32, 32, 32), "group2": (64, 16, 16), "group3": (128, 8, 8)}
# RepDistiller's VGG: blocks 1-4 at 16, 8, 4 and (no max-pool before the fifth block at 32x32) 4 pixels.
BENCHMARK_VGG_TAPS = {"block1": (128, 16, 16), "block2": (256, 8, 8), "block3": (512, 4, 4), "block4": (512, 4, 4)}
TORCHVISION_RESNET_TAPS = {"layer1": (64, 8, 8), "layer2": (128, 4, 4), "layer3": (256, 2, 2),
                           "layer4": (512, 1, 1)}
TAPS = {
    **dict.fromkeys(["res8", "res14", "res20", "res32", "res44", "res56", "res110"], CIFAR_RESNET_TAPS),
    **dict.fromkeys(["res8x4", "res32x4"], {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8)}),
    **dict.fromkeys(
        ["res18", "res34"],
        {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "layer4": (512, 4, 4)},
    ),
    "res50": {"layer1": (256, 32, 32), "layer2": (512, 16, 16), "layer3": (1024, 8, 8), "layer4": (2048, 4, 4)},
    "vgg11": {"pool1": (64, 16, 16), "pool2": (128, 8, 8), "pool3": (256, 4, 4), "pool4": (512, 2, 2)},
    **dict.fromkeys(["vgg8", "vgg13"], BENCHMARK_VGG_TAPS),
    "wrn_16_2": WRN_2_TAPS,
    "wrn_28_2": WRN_2_TAPS,
    "wrn_40_1": {"group1": (16, 32, 32), "group2": (32, 16, 16), "group3": (64, 8, 8)},
    "wrn_40_2": WRN_2_TAPS,
    # RepDistiller's feat[1:-1] of each: MobileNetV2's groups 2, 3, 5, 7 (its stride-2 stem halves the map first);
    # the ShuffleNets' three stages.
    "mobilenetv2": {"group2": (12, 16, 16), "group3": (16, 8, 8), "group5": (48, 4, 4), "group7": (160, 2, 2)},
    "shufflev1": {"layer1": (240, 16, 16), "layer2": (480, 8, 8), "layer3": (960, 4, 4)},
    "shufflev2": {"layer1": (116, 16, 16), "layer2": (232, 8, 8), "layer3": (464, 4, 4)},
    # torchvision's ImageNet models at 32 pixels: the stem's stride 4 leaves 8 pixels for the first stage
    **dict.fromkeys(["resnet18", "resnet34"], TORCHVISION_RESNET_TAPS),
    "resnet50": {"layer1": (256, 8, 8), "layer2": (512, 4, 4), "layer3": (1024, 2, 2), "layer4": (2048, 1, 1)},
    "mobilenet_v2": {"features.3": (24, 8, 8), "features.6": (32, 4, 4), "features.13": (96, 2, 2),
                     "features.18": (1280, 1, 1)},
}

ONE_PER_FAMILY = ["res8", "res18", "vgg11", "vgg8", "wrn_16_2", "mobilenetv2", "shufflev1", "shufflev2"]


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tables_cover_registry():
    assert MODEL_NAMES == tuple(PARAMS) == tuple(TAPS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_with_exact_param_counts_and_finite_logits(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for num_classes, expected in zip((10, 100), PARAMS[name], strict=True):
        model = build_model(name, num_classes)
        assert isinstance(model, TapModel)
        assert num_params(model) == expected
        logits = model(x)
        assert logits.shape == (2, num_classes)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("ours", REPDISTILLER_NAMES)
def test_parameter_counts_and_state_dict_sizes_equal_repdistillers(ours):
    """Each model shared with RepDistiller's registry has its parameter count for 10 and 100 classes, and as many
    state-dict entries of the same shapes (as a multiset) as RepDistiller's definition of it."""
    theirs = REPDISTILLER_NAMES[ours]
    assert PARAMS[ours] == (parameter_count(theirs, 10), parameter_count(theirs, 100))
    with torch.device("meta"):
        model = build_model(ours, 100)
    our_shapes = sorted(tuple(t.shape) for t in model.state_dict().values())
    assert our_shapes == sorted(repdistiller_shapes(theirs, 100).values())


def test_benchmark_vgg_pools_before_its_fifth_block_only_for_larger_maps():
    """RepDistiller's rule (a max-pool before block 4 for 64-pixel images only) at 32 and 64 pixels."""
    model = build_model("vgg8", 10)
    assert model.tap_shapes(32)[-1] == (512, 4, 4) and model.tap_shapes(64)[-1] == (512, 4, 4)
    assert model.tap_shapes(64)[-2] == (512, 8, 8)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_taps_match_table_and_forward(name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = TAPS[name]
    assert model.tap_names == tuple(expected)
    assert model.tap_shapes() == list(expected.values())
    with torch.no_grad():
        logits, taps, pooled = model.forward_features(x)
        assert torch.equal(logits, model(x))
    assert [tuple(t.shape) for t in taps] == [(2, *shape) for shape in expected.values()]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_tap_shapes_has_no_side_effects(name, training):
    model = build_model(name, 10)
    model(torch.randn(2, 3, 32, 32))  # a train-mode pass gives BN non-default running statistics
    model.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.tap_shapes()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training == training for m in model.modules())


def test_tap_shapes_keeps_mixed_train_eval_flags():
    model = build_model("res8", 10).train()
    model.stages[1].eval()
    flags = [m.training for m in model.modules()]
    model.tap_shapes()
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_channels_last_and_autocast(name):
    model, x = model_and_images(name)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, taps, pooled = model.forward_features(x)
    assert logits.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in taps)
    assert torch.isfinite(logits.float()).all()


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as excinfo:
        build_model("res9000", 10)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message == f"unknown model 'res9000'; choose from: {', '.join(MODEL_NAMES)}"
