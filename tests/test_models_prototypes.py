import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from anomdiff.data.synthetic import category_specs, paste_anomaly, render_normal
from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, PrototypeConfig, load_preset
from anomdiff.models.dpdiff import DPDiffModel
from anomdiff.models.features import FeatureExtractor
from anomdiff.models.params import count_parameters
from anomdiff.models.prototypes import PrototypeBanks, squared_distances, usage_entropy

SIZE = 32
SMALL_BANKS = {"dim": 32, "num_local": 32, "num_global": 8}


def images(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def normals(categories: int, per_category: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return images([render_normal(s, rng, size) for s in category_specs(categories) for _ in range(per_category)])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CPU is shared; one thread avoids oversubscription stalls and keeps runs reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone() -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(load_preset("tiny").backbone)


def banks_for(backbone, **overrides) -> PrototypeBanks:
    torch.manual_seed(0)
    return PrototypeBanks(PrototypeConfig(**{**SMALL_BANKS, **overrides}), backbone.channels, [8], 8)


def tiny_dpdiff(num_categories=2) -> DPDiffModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"method": "dpdiff", "prototypes": SMALL_BANKS}, base=load_preset("tiny"))
    return build_model(cfg, num_categories)


def test_ot_term_equals_pots_value_and_its_gradient_reaches_the_global_bank_only(backbone):
    banks = banks_for(backbone, ot_entropy=0.05)
    maps = backbone(normals(4, 2))
    out = banks(maps, (8, 8))
    out.ot.backward()
    # POT on the same inputs, in NumPy float64: unit image-level features, unit prototypes, uniform marginals
    with torch.no_grad():
        features = F.normalize(banks.embed(maps, (8, 8)).mean((2, 3)), dim=-1).double().numpy()
        bank = F.normalize(banks.global_bank, dim=-1).double().numpy()
    cost = ot.dist(features, bank)  # squared Euclidean
    expected = ot.sinkhorn2(ot.unif(len(features)), ot.unif(len(bank)), cost, 0.05, method="sinkhorn_log")
    assert out.ot.item() == pytest.approx(float(expected), rel=1e-4)
    assert banks.global_bank.grad is not None and banks.global_bank.grad.abs().sum() > 0
    assert banks.project.weight.grad is None  # the bank follows the features; OT does not move the projector


def _train_global_bank(banks, maps, use_ot: bool, steps=60) -> torch.Tensor:
    """Hard nearest-prototype assignment of every image after ``steps`` Adam steps on the whole set,
    with the OT term or with a nearest-prototype (k-means) pull instead."""
    optimizer = torch.optim.Adam([banks.global_bank], lr=0.1)
    for _ in range(steps):
        out = banks(maps, (8, 8))
        if use_ot:
            loss = out.ot
        else:
            image_level = F.normalize(out.features.mean((2, 3)), dim=-1).detach()
            loss = squared_distances(image_level, F.normalize(banks.global_bank, dim=-1)).min(1).values.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = banks(maps, (8, 8), losses=False)
        image_level = F.normalize(out.features.mean((2, 3)), dim=-1)
        nearest = squared_distances(image_level, F.normalize(banks.global_bank, dim=-1)).argmin(1)
    return F.one_hot(nearest, banks.cfg.num_global)


def test_after_short_training_on_16_categories_no_global_prototype_is_dead(backbone):
    # 16 categories x 4 images, K_G = 8, 60 steps. Measured over bank seeds 0-2: with OT every prototype
    # is the nearest of 4-17 images, normalised usage entropy 0.95-0.96; the nearest-prototype pull
    # alone leaves most prototypes dead.
    maps = backbone(normals(16, 4))
    with_ot = _train_global_bank(banks_for(backbone), maps, use_ot=True)
    without = _train_global_bank(banks_for(backbone), maps, use_ot=False)
    assert (with_ot.sum(0) > 0).all(), with_ot.sum(0).tolist()
    assert usage_entropy(with_ot) > 0.85
    assert usage_entropy(without) < usage_entropy(with_ot) - 0.2


def test_local_aggregation_rebuilds_a_normal_region_closer_than_a_pasted_defect(backbone):
    size, grid = 64, (16, 16)
    banks = banks_for(backbone, num_local=64)
    train_maps = backbone(normals(4, 6, size=size))
    optimizer = torch.optim.Adam([banks.local_bank], lr=0.05)
    for _ in range(40):  # the commitment loss alone pulls the bank onto the normal features
        loss = banks(train_maps, grid).commitment
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rng = np.random.default_rng(1)
    defective, masks = [], []
    for spec in category_specs(4):
        for kind in ("stain", "foreign", "scratch", "hole"):
            image, mask = paste_anomaly(render_normal(spec, rng, size), rng, kind=kind)
            defective.append(image)
            masks.append(mask)
    with torch.no_grad():
        out = banks(backbone(images(defective)), grid, losses=False)
    error = (out.features - out.local).pow(2).sum(1)
    cover = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(masks)).float()[:, None], grid)[:, 0]
    defect, normal = cover > 0.5, cover == 0
    keep = defect.flatten(1).any(1)  # defects covering at least half a grid cell
    inside = (error * defect).flatten(1).sum(1) / defect.flatten(1).sum(1).clamp_min(1)
    outside = (error * normal).flatten(1).sum(1) / normal.flatten(1).sum(1)
    assert keep.sum() >= 8
    # measured: defect cells rebuilt with 2.6x the error of normal cells, in every kept image
    assert (inside[keep] > outside[keep]).float().mean() >= 0.9
    assert inside[keep].mean() > 1.5 * outside[keep].mean()


def test_zero_initialised_injection_leaves_diads_residuals_unchanged():
    model = tiny_dpdiff()
    x = normals(2, 1)
    local = model.prototype_condition(x).local
    z = torch.randn(2, 4, SIZE // 4, SIZE // 4)
    context = model.context({"image": x, "category_index": torch.tensor([0, 1])})
    down, mid = model.sg(z, torch.tensor([500, 500]), context, x)
    new_down, new_mid = model.prototypes.residuals(local, down, mid)
    assert all(torch.equal(a, b) for a, b in zip(down, new_down, strict=True)) and torch.equal(mid, new_mid)


def test_conditioning_on_another_images_prototypes_changes_the_reconstruction():
    model = tiny_dpdiff().eval()
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: the injection convs are no longer zero
        for conv in model.prototypes.inject:
            conv.weight.normal_(0, 0.5)
    x = normals(2, 1)
    batch = {"image": x, "category_index": torch.tensor([0, 1])}
    own = model.reconstruct(batch)
    assert torch.equal(own, model.reconstruct({**batch, "prototype_source": x}))
    swapped = model.reconstruct({**batch, "prototype_source": x.flip(0)})
    assert (own - swapped).abs().mean() > 1e-3


def test_training_loss_reports_its_terms_and_trains_the_banks_whatever_trainable_says():
    model = tiny_dpdiff()
    model.cfg.trainable = ["sg"]
    model.set_stage("denoiser")
    assert all(p.requires_grad for p in model.prototypes.parameters())
    batch = {"image": normals(2, 2), "category_index": torch.tensor([0, 0, 1, 1])}
    out = model.training_loss(batch)
    p = model.cfg.prototypes
    assert set(out) == {"loss", "mse", "ot", "commitment"}
    assert out["loss"].item() == pytest.approx(
        (out["mse"] + p.lambda_ot * out["ot"] + p.lambda_local * out["commitment"]).item(), rel=1e-5
    )
    out["loss"].backward()
    assert model.prototypes.global_bank.grad.abs().sum() > 0
    assert model.prototypes.local_bank.grad.abs().sum() > 0
    assert model.context_provider.providers[1].tokens.grad.abs().sum() > 0


def test_params_count_the_prototypes_for_dpdiff_and_nothing_else_changes():
    diad, dpdiff = count_parameters("tiny", "diad"), count_parameters("tiny", "dpdiff")
    assert diad["prototypes"] == 0 and dpdiff["prototypes"] > 0
    assert {k: dpdiff[k] for k in ("unet", "sg", "vae")} == {k: diad[k] for k in ("unet", "sg", "vae")}
    assert dpdiff["total"] == diad["total"] + dpdiff["prototypes"]
    d, k_l, k_g = 256, 256, 32  # defaults on the tiny preset: banks alone are (K_L + K_G) x dim
    assert dpdiff["prototypes"] > (k_l + k_g) * d


def test_saved_dpdiff_model_loads_as_dpdiff_with_the_same_banks(tmp_path):
    model = tiny_dpdiff()
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, DPDiffModel) and loaded.cfg.prototypes == model.cfg.prototypes
    assert torch.equal(loaded.prototypes.local_bank, model.prototypes.local_bank)
    x = normals(2, 1)
    assert torch.allclose(loaded.prototype_condition(x).weights, model.prototype_condition(x).weights)


def test_prototype_config_rejects_top_k_above_the_bank_size():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig.from_dict({"prototypes": {"num_local": 4, "top_k": 8}})
