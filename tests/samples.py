"""Small batches of the synthetic generator's images, normal or with pasted defects, for model tests."""

import numpy as np
import torch

from anomdiff.data.synthetic import category_specs, paste_anomaly_float, render_normal


def images(category: int, n: int, seed: int, defects: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n 64 px normals of a synthetic category in [-1, 1] (or the same with one pasted defect each) and masks."""
    spec = category_specs(category + 1, seed=0)[category]
    rng = np.random.default_rng(seed)
    out, masks = [], []
    for _ in range(n):
        image = render_normal(spec, rng, 64).astype(np.float32) / 255.0
        mask = np.zeros(image.shape[:2], np.float32)
        if defects:
            image, mask, _ = paste_anomaly_float(image, rng)
        out.append(image)
        masks.append(mask)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() * 2 - 1
    return x, torch.from_numpy(np.stack(masks).astype(np.float32))


def with_defects(clean: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The same images, each with one pasted defect, and the defects' masks."""
    rng = np.random.default_rng(seed)
    pairs = [paste_anomaly_float(((x.permute(1, 2, 0).numpy() + 1) / 2).astype(np.float32), rng)[:2] for x in clean]
    defective = torch.from_numpy(np.stack([d for d, _ in pairs])).permute(0, 3, 1, 2).float() * 2 - 1
    return defective, torch.from_numpy(np.stack([m for _, m in pairs]).astype(np.float32))


def noise_bank_knn(image_size: int = 32, num_categories: int = 1, seed: int = 0):
    """A tiny-preset knn model whose memory bank holds the patch features of two noise images, one bank
    per category: a fitted model in a second, for tests where any scores will do."""
    from anomdiff.models import build_model
    from anomdiff.models.config import ModelConfig, load_preset

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({"method": "knn", "image_size": image_size}, base=load_preset("tiny"))
    knn = build_model(cfg, num_categories)
    features = knn.patch_features(torch.rand(2, 3, image_size, image_size) * 2 - 1)
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    knn.build_memory(dict.fromkeys(range(num_categories), rows))
    return knn
