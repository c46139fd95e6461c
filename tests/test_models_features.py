"""The backbone: ImageNet weights installed with the project, strict loading of weight files, random
networks with live residual branches."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from anomdiff.models.config import BackboneConfig
from anomdiff.models.features import FeatureExtractor
from anomdiff.models.imagenet import imagenet_state_dict, map_by_position, packaged_file

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def classify(model: torch.nn.Module, rgb) -> list[int]:
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        logits = model((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    return logits[0].topk(3).indices.tolist()


def test_the_packaged_weights_classify_a_cat_and_an_espresso():
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(imagenet_state_dict("efficientnet_lite0"), strict=False)
    assert classify(model, data.chelsea())[0] in CATS
    assert classify(model, data.coffee())[0] == ESPRESSO


def test_the_mapping_covers_every_tensor_of_the_timm_network_in_order():
    source = torch.load(packaged_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_by_position(source, target)
    weights = [k for k in target if not k.endswith("num_batches_tracked")]
    assert list(mapped) == weights  # nothing left over, nothing left random
    assert all(mapped[k].shape == target[k].shape for k in weights)
    shuffled = dict(reversed(list(source.items())))
    with pytest.raises(ValueError, match="does not fit"):
        map_by_position(shuffled, target)
    with pytest.raises(ValueError, match="not the same architecture"):
        map_by_position(source, timm.create_model("efficientnet_lite1", pretrained=False).state_dict())


def test_the_imagenet_backbone_carries_the_packaged_weights():
    extractor = FeatureExtractor(BackboneConfig(name="efficientnet_lite0", layers=[1, 2], pretrained="imagenet"))
    state = imagenet_state_dict("efficientnet_lite0")
    own = extractor.backbone.state_dict()
    assert torch.equal(own["blocks.1.0.conv_pw.weight"], state["blocks.1.0.conv_pw.weight"])
    assert all(torch.equal(v, state[k]) for k, v in own.items() if not k.endswith("num_batches_tracked"))


def test_imagenet_weights_exist_only_where_a_package_installs_them():
    with pytest.raises(ValueError, match="installed for efficientnet_lite0 only"):
        BackboneConfig(name="resnet18", pretrained="imagenet")


def test_a_weights_file_that_does_not_cover_the_backbone_is_refused_with_its_missing_keys(tmp_path):
    # efficientnet_pytorch's own key names: timm would load this file non-strictly and stay random
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.load(packaged_file("efficientnet_lite0"), map_location="cpu", weights_only=True), foreign)
    with pytest.raises(ValueError, match=r"does not hold 240 of the efficientnet_lite0 backbone's tensors "
                                         r"\(conv_stem.weight"):
        FeatureExtractor(BackboneConfig(name="efficientnet_lite0", layers=[1, 2], pretrained=str(foreign)))
    good = tmp_path / "timm.safetensors"
    save_file(imagenet_state_dict("efficientnet_lite0"), str(good))
    loaded = FeatureExtractor(BackboneConfig(name="efficientnet_lite0", layers=[1, 2], pretrained=str(good)))
    assert torch.equal(loaded.backbone.state_dict()["conv_stem.weight"],
                       imagenet_state_dict("efficientnet_lite0")["conv_stem.weight"])


def test_a_random_resnet_has_live_residual_branches():
    torch.manual_seed(0)
    extractor = FeatureExtractor(BackboneConfig(name="resnet18", layers=[1, 2]))
    last_gains = [m.bn2.weight for m in extractor.backbone.modules() if isinstance(m, timm.models.resnet.BasicBlock)]
    assert last_gains and all(bool((g != 0).all()) for g in last_gains)
    # and the blocks do something: layer1's output is not its input passed through
    x = torch.randn(1, 3, 64, 64)
    stem = extractor.backbone.maxpool(extractor.backbone.act1(extractor.backbone.bn1(extractor.backbone.conv1(x))))
    assert not torch.allclose(extractor.backbone.layer1(stem), F.relu(stem))
