"""Pro-AD: the constraint against the soft identity mapping, prototypes fed by every level, and maps."""

from unittest.mock import patch

import pytest
import torch
from samples import images, with_defects

from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.train_loop import fit

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_proad(overrides=None):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict({"method": "proad", **(overrides or {})}, base=load_preset("tiny")), 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_every_level_feeds_the_prototypes_only_in_the_bidirectional_decoder(bidirectional):
    """Prototypes <- features (Pro-AD's second direction): changing any one encoder level changes
    this image's prototypes; a one-way decoder keeps them as learned."""
    model = tiny_proad({"proad": {"bidirectional": bidirectional}}).eval()
    x, _ = images(0, 2, seed=0)
    levels = model.features(x)
    assert len(levels) == len(model.cfg.proad.layers) == 2
    with torch.no_grad():
        _, _, inner = model.reconstruct(x)
        for level in range(len(levels)):
            moved = [f + torch.randn_like(f) if i == level else f for i, f in enumerate(levels)]
            with patch.object(model.features, "forward", lambda images, moved=moved: moved):
                _, _, changed = model.reconstruct(x)
            difference = (changed["prototypes"] - inner["prototypes"]).abs().max()
            assert (difference > 1e-4) == bidirectional, (level, float(difference))


def test_the_prototypes_receive_gradient_from_every_feature_level():
    """The reconstruction loss of each level alone reaches the learned prototypes (through the
    prototype reconstruction of the tokens), in both decoder directions."""
    for bidirectional in (True, False):
        model = tiny_proad({"proad": {"bidirectional": bidirectional}}).train()
        x, _ = images(0, 2, seed=0)
        for level in range(len(model.cfg.proad.layers)):
            model.zero_grad()
            targets, rebuilt, _ = model.reconstruct(x)
            (1 - torch.nn.functional.cosine_similarity(targets[level], rebuilt[level], dim=1)).mean().backward()
            assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0, (bidirectional, level)


def test_a_one_way_decoder_has_no_aggregation_and_counts_its_prototypes():
    full, one_way = tiny_proad(), tiny_proad({"proad": {"bidirectional": False}})
    assert full.parameter_counts()["prototypes"] == 64 * 128 == one_way.parameter_counts()["prototypes"]
    assert full.parameter_counts()["decoder"] > one_way.parameter_counts()["decoder"]
    assert not any("aggregate" in name for name, _ in one_way.named_parameters())
    assert all(not p.requires_grad for p in full.features.parameters())


@pytest.fixture(scope="module")
def trained():
    """Tiny Pro-AD trained for 300 steps on 32 normals of one synthetic category."""
    model = tiny_proad()
    batches = [{"image": images(1, 8, seed=s)[0]} for s in range(4)]
    fit(model, batches, steps=300, lr=1e-3, schedule="constant")
    return model.eval()


def contrast(model, x, masks) -> float:
    """Mean map inside the defects over the mean outside them."""
    maps = model.score({"image": x})["anomaly_map"]
    return float(((maps * masks).sum() / masks.sum()) / ((maps * (1 - masks)).sum() / (1 - masks).sum()))


@pytest.mark.slow
def test_the_constraint_keeps_a_defect_from_being_rebuilt_through_attention(trained):
    """The soft identity mapping, measured on the same weights: with the residual path around the
    prototype reconstruction, the defect is rebuilt nearly as well as the normal pixels; with the
    constraint it stands out."""
    defective, masks = with_defects(images(1, 6, seed=200)[0])
    with_constraint = contrast(trained, defective, masks)
    trained.cfg.proad.constraint = False
    try:
        without = contrast(trained, defective, masks)
    finally:
        trained.cfg.proad.constraint = True
    assert with_constraint > 1.3 and with_constraint > without + 0.2, (with_constraint, without)


@pytest.mark.slow
def test_a_pasted_defect_is_hotter_than_the_same_pixels_of_the_clean_image(trained, tmp_path):
    clean, _ = images(1, 6, seed=200)
    defective, masks = with_defects(clean)
    hot = (trained.score({"image": defective})["anomaly_map"] * masks).sum()
    cool = (trained.score({"image": clean})["anomaly_map"] * masks).sum()
    assert hot > 1.3 * cool
    trained.save(tmp_path / "proad")
    loaded = load_model(tmp_path / "proad")
    assert torch.equal(loaded.score({"image": clean})["anomaly_map"], trained.score({"image": clean})["anomaly_map"])
