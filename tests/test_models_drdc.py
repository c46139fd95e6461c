"""DRDC: disjoint mask sets, the closed identical shortcut, the fusion weight, a pasted defect, persistence."""

from contextlib import contextmanager

import pytest
import torch
from samples import images, noise_bank_knn, with_defects

from anomdiff.models import build_model, load_model
from anomdiff.models.config import ModelConfig, load_preset
from anomdiff.models.drdc import mask_sets, refinement_timesteps
from anomdiff.models.pretrained import PretrainedNotFoundError
from anomdiff.models.train_loop import fit

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_drdc(overrides=None, num_categories=1):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"method": "drdc", **(overrides or {})}, base=load_preset("tiny"))
    return build_model(cfg, num_categories)


@contextmanager
def with_drdc(model, **drdc):
    """The same weights under other inference keys (what evaluate's model.drdc.* overrides do), the
    model's own keys back afterwards (the trained model is shared by the module)."""
    cfg = model.cfg
    model.cfg = ModelConfig.from_dict({"drdc": drdc}, base=cfg)
    try:
        yield model
    finally:
        model.cfg = cfg


@pytest.fixture(scope="module")
def trained(one_cpu_thread):
    """30 steps on one synthetic category: enough for the inpainter to rebuild its texture roughly."""
    model = tiny_drdc()
    x, _ = images(0, 16, seed=0)
    batches = [{"image": x[i:i + 8], "category_index": torch.zeros(8, dtype=torch.long)} for i in (0, 8)]
    fit(model, batches, steps=30, lr=2e-3)
    return model


@pytest.fixture(scope="module")
def pasted(trained):
    """``maps`` (base, refinement, fused) of four normals and of the same four with a pasted defect each,
    under the model's own keys (gamma 0.5), and the defects' masks."""
    clean, _ = images(0, 4, seed=9)
    defective, masks = with_defects(clean)
    return trained.maps({"image": clean}), trained.maps({"image": defective}), masks


def mean_inside(maps, masks):
    return float((maps * masks).sum() / masks.sum())


def contrast(maps, masks):
    """How much hotter the masked pixels are than the rest, whatever the map's scale."""
    return mean_inside(maps, masks) / mean_inside(maps, 1 - masks)


@pytest.mark.parametrize("height, width, count, patch", [(64, 64, 4, 8), (60, 52, 3, 16), (32, 48, 7, 8),
                                                          (64, 64, 2, 16)])
def test_the_mask_sets_are_disjoint_and_cover_the_image(height, width, count, patch):
    sets = mask_sets(height, width, count, patch, seed=3)
    assert sets.shape == (count, height, width)
    assert torch.equal(sets.sum(0), torch.ones(height, width))  # every pixel masked in exactly one set
    sizes = sets.sum((1, 2))
    assert sizes.min() > 0 and sizes.max() - sizes.min() <= patch * patch  # balanced to one cell
    assert not torch.equal(sets, mask_sets(height, width, count, patch, seed=4))  # the seed decides the deal


def test_more_mask_sets_than_cells_are_refused():
    with pytest.raises(ValueError, match="5 mask sets need at least as many 32 px cells"):
        mask_sets(64, 64, 5, 32, seed=0)
    with pytest.raises(ValueError, match=r"model.drdc.mask_sets \(20\) exceeds the 16 mask cells"):
        ModelConfig.from_dict({"method": "drdc", "drdc": {"mask_sets": 20, "patch": 16}}, base=load_preset("tiny"))


def test_a_masked_pixel_never_reaches_its_own_inpainting(trained):
    """The identical shortcut is closed: a masked pixel's value does not move its own set's inpainting
    (it does move the other sets', where it is context)."""
    x, _ = images(0, 2, seed=1)
    before, sets = trained.inpaintings({"image": x})
    ys, xs = torch.nonzero(sets[0], as_tuple=True)
    y, x_ = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    changed = x.clone()
    changed[:, :, y - 1:y + 2, x_ - 1:x_ + 2] = -changed[:, :, y - 1:y + 2, x_ - 1:x_ + 2]  # a 3 x 3 "defect"
    assert sets[0, y - 1:y + 2, x_ - 1:x_ + 2].all()
    after, _ = trained.inpaintings({"image": changed})
    hidden = sets[0].bool()
    assert torch.allclose(after[:, :, 0][..., hidden], before[:, :, 0][..., hidden], atol=1e-6)
    elsewhere = sets[1].bool()
    assert (after[:, :, 1][..., elsewhere] - before[:, :, 1][..., elsewhere]).abs().max() > 1e-3


def test_gamma_zero_gives_the_base_map_and_one_the_refinement_alone(trained):
    x, _ = images(0, 1, seed=2)
    base = trained.base.score({"image": x})["anomaly_map"]
    refinement = trained.refinement_map({"image": x})
    assert not torch.allclose(refinement, base, atol=1e-2)  # the two ends differ, so each check below can fail
    with with_drdc(trained, gamma=0.0):
        assert torch.equal(trained.score({"image": x})["anomaly_map"], base)
    with with_drdc(trained, gamma=1.0):
        assert torch.allclose(trained.score({"image": x})["anomaly_map"], refinement)


def test_a_pasted_defect_raises_the_refinement_and_the_fused_map_at_the_defect(pasted):
    """The same pixels, normal and then under a pasted defect: hotter in the refinement and, through it,
    in the fused map the model scores with by more than in the base map alone."""
    clean, defective, masks = pasted
    rise = {k: mean_inside(defective[k], masks) / mean_inside(clean[k], masks) for k in ("base", "refinement", "fused")}
    assert rise["refinement"] > 1.5, rise
    assert rise["fused"] > 1.2 and rise["fused"] > rise["base"], rise


def test_the_fused_map_shows_a_defect_the_base_map_barely_sees(pasted):
    """Pro-AD's map after 30 steps is barely hotter on the pasted defects than around them, the
    refinement clearly is: mixing it in makes the defects stand out more than in the base map."""
    _, defective, masks = pasted
    assert contrast(defective["base"], masks) < 1.3 < contrast(defective["refinement"], masks)
    assert contrast(defective["fused"], masks) > 1.08 * contrast(defective["base"], masks)


def test_the_refinement_uses_n_t_timesteps_from_t_nt():
    assert refinement_timesteps(3, 600) == [600, 400, 200]
    assert refinement_timesteps(1, 300) == [300]


def test_more_timesteps_change_the_fused_map_but_average_rather_than_add_up(trained):
    """n_t = 1 and 2: the fused map changes, while the refinement keeps its scale against the base map
    (the timesteps' maps are averaged, not summed)."""
    x, _ = images(0, 1, seed=2)
    with with_drdc(trained, timesteps=1):
        one = trained.maps({"image": x})
    with with_drdc(trained, timesteps=2):
        two = trained.maps({"image": x})
    assert (two["fused"] - one["fused"]).abs().max() > 1e-3
    assert 0.67 < float(two["refinement"].mean() / one["refinement"].mean()) < 1.5


def test_training_reaches_the_base_the_inpainter_and_the_category_head():
    model = tiny_drdc(num_categories=2).train()
    x, _ = images(0, 2, seed=0)
    out = model.training_loss({"image": x, "category_index": torch.tensor([0, 1])})
    out["loss"].backward()
    assert set(out) == {"loss", "base", "inpainting", "category"}
    for name, part in [("prototypes", model.base.prototypes), ("inpainter", model.inpainter.conv_in.weight),
                       ("category head", model.category_head.weight), ("tokens", model.category_tokens)]:
        assert part.grad is not None and part.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.base.features.parameters())  # the backbone stays frozen
    assert model.stages == ("denoiser",)  # pixel space: no autoencoder stage


def test_trainable_names_what_the_denoiser_stage_trains():
    """``model.drdc.trainable``: the inpainter's decoder and the context without the base (what the
    CPU smoke of the paper-size model trains); an unknown part is named."""
    model = tiny_drdc({"drdc": {"trainable": ["inpainter_decoder", "context"]}}, num_categories=2).train()
    trained = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trained for p in model.inpainter.up_blocks.parameters())
    assert not any(id(p) in trained for p in [*model.inpainter.down_blocks.parameters(), *model.base.parameters()])
    assert id(model.category_tokens) in trained and id(model.category_head.weight) in trained
    x, _ = images(0, 2, seed=0)
    out = model.training_loss({"image": x, "category_index": torch.tensor([0, 1])})
    out["loss"].backward()
    assert float(out["base"]) == 0.0 and model.inpainter.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"model.drdc.trainable: unknown part 'unet'; choose from \['base', 'context'"):
        tiny_drdc({"drdc": {"trainable": ["unet"]}})


def test_scoring_is_label_free_unless_category_aware():
    x, _ = images(0, 1, seed=0)
    out = tiny_drdc({"drdc": {"timesteps": 1, "ddim_steps": 1}}).eval().score({"image": x})  # no category_index
    assert out["anomaly_map"].shape == (1, 64, 64) and out["image_score"].shape == (1,)
    aware = tiny_drdc({"conditioning": "category_aware", "drdc": {"timesteps": 1, "ddim_steps": 1}}, 2).eval()
    with pytest.raises(ValueError, match="category_aware: the batch needs category_index"):
        aware.score({"image": x})
    assert aware.score({"image": x, "category_index": torch.tensor([1])})["anomaly_map"].shape == (1, 64, 64)


def test_the_saved_model_scores_identically_after_load(trained, tmp_path):
    x, _ = images(0, 2, seed=4)
    trained.save(tmp_path / "drdc", metadata={"categories": ["a"]})
    loaded = load_model(tmp_path / "drdc")
    assert loaded.method == "drdc" and loaded.metadata == {"categories": ["a"]}
    assert torch.allclose(loaded.score({"image": x})["anomaly_map"], trained.score({"image": x})["anomaly_map"])


def test_latent_space_trains_its_autoencoder_first_and_inpaints_latents():
    model = tiny_drdc({"drdc": {"space": "latent", "timesteps": 1, "ddim_steps": 2}})
    assert model.stages == ("vae", "denoiser") and model.inpainter.config.in_channels == 2 * 4 + 1
    x, _ = images(0, 2, seed=0)
    model.set_stage("vae")
    assert all(p.requires_grad for p in model.vae.parameters()) and not model.inpainter.conv_in.weight.requires_grad
    assert model.vae_loss({"image": x})["loss"].requires_grad
    model.set_stage("denoiser")
    assert model.training_loss({"image": x, "category_index": torch.zeros(2, dtype=torch.long)})["loss"].isfinite()
    assert model.eval().score({"image": x})["anomaly_map"].shape == (2, 64, 64)


def write_diffusers_folder(path, unet, vae):
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")


def test_pretrained_inpainting_weights_load_and_a_plain_unet_is_refused(tmp_path):
    from anomdiff.models.unet import build_unet

    source = tiny_drdc({"drdc": {"space": "latent"}})
    write_diffusers_folder(tmp_path / "inpaint", source.inpainter, source.vae)
    torch.manual_seed(1)
    model = tiny_drdc({"drdc": {"space": "latent", "pretrained": str(tmp_path / "inpaint")}})
    assert torch.equal(model.inpainter.conv_in.weight, source.inpainter.conv_in.weight)
    write_diffusers_folder(tmp_path / "plain", build_unet(source.cfg), source.vae)  # text-to-image: 4 channels in
    with pytest.raises(ValueError, match="takes 4 input channels, an inpainting UNet takes 9"):
        tiny_drdc({"drdc": {"space": "latent", "pretrained": str(tmp_path / "plain")}})
    with pytest.raises(PretrainedNotFoundError, match="model.drdc.pretrained: folder .* does not exist"):
        tiny_drdc({"drdc": {"space": "latent", "pretrained": str(tmp_path / "missing")}})


@pytest.mark.parametrize("drdc, message", [
    ({"start_timestep": 500}, r"start_timestep must be in \[timesteps, train_max_timestep\] = \[2, 400\]"),
    ({"filter_size": 4}, "filter_size must be odd"),
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"space": "voxel"}, "space must be one of pixel, latent"),
    ({"base_method": "diad"}, "the base trained in the same run is proad .* as model.drdc.base_model"),
    ({"scales": []}, "scales must be a non-empty list"),
])
def test_bad_drdc_keys_are_named(drdc, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({"method": "drdc", "drdc": drdc}, base=load_preset("tiny"))


def test_an_exported_base_model_gives_the_base_map_frozen_and_travels_with_the_model(tmp_path):
    """``model.drdc.base_model``: any method's exported folder; its map is the base map, it does not
    train, and the saved DRDC model holds it in ``base/`` (the source folder can go)."""
    import shutil

    from anomdiff.models.pretrained import pretrained_problems

    knn = noise_bank_knn(image_size=64, seed=3)
    x, _ = images(0, 2, seed=0)
    knn.save(tmp_path / "knn", metadata={"categories": ["a"]})
    cfg = {"drdc": {"base_model": str(tmp_path / "knn"), "timesteps": 1, "ddim_steps": 1}}
    model = tiny_drdc(cfg)
    assert model.base.method == "knn" and model.base_frozen
    out = model.training_loss({"image": x, "category_index": torch.zeros(2, dtype=torch.long)})
    assert float(out["base"]) == 0.0 and not any(p.requires_grad for p in model.base.parameters())
    probe, _ = images(0, 1, seed=5)
    expected = knn.score({"image": probe})["anomaly_map"]
    with with_drdc(model, gamma=0.0):  # saved with gamma 0: the loaded model scores with the base map too
        assert torch.equal(model.score({"image": probe})["anomaly_map"], expected)
        model.save(tmp_path / "drdc", metadata={"categories": ["a"]})
    shutil.rmtree(tmp_path / "knn")
    loaded = load_model(tmp_path / "drdc")
    assert sorted(p.name for p in (tmp_path / "drdc").iterdir()) == ["base", "config.json", "model.safetensors"]
    assert torch.equal(loaded.score({"image": probe})["anomaly_map"], expected)
    problems = pretrained_problems(ModelConfig.from_dict({"method": "drdc", **cfg}, base=load_preset("tiny")))
    assert problems and problems[0].startswith("model.drdc.base_model: ") and "config.json is missing" in problems[0]
