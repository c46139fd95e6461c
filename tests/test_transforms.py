import numpy as np
import torch

from anomdiff.data.manifest import read_manifest, shard_paths
from anomdiff.data.schema import read_shard
from anomdiff.data.synthetic import synthesize
from anomdiff.data.transforms import COLUMNS, DecodeBatch, unit_range


def test_training_decoding_is_the_float_decoding_before_normalisation_without_masks(tmp_path):
    synthesize(tmp_path / "d", 2, seed=0, image_size=32, train_per_category=4, test_per_category=2, workers=1)
    manifest = read_manifest(tmp_path / "d")
    categories = sorted(manifest["counts"])
    rows = read_shard(shard_paths(tmp_path / "d", manifest, "test", categories)[0], columns=list(COLUMNS))
    as_float = DecodeBatch(24, categories)(rows)  # resized: the pixels go through PIL either way
    as_uint8 = DecodeBatch(24, categories, training=True)(rows)
    assert set(as_uint8) == {"image", "category_index"}  # a training step reads no mask, label or id
    assert as_uint8["image"].dtype == np.uint8 and as_float["image"].dtype == np.float32
    np.testing.assert_allclose(unit_range(as_uint8["image"]), as_float["image"], atol=1e-6)
    on_device = unit_range(torch.from_numpy(as_uint8["image"]))
    assert on_device.dtype == torch.float32 and on_device.min() >= -1 and on_device.max() <= 1
    np.testing.assert_array_equal(as_uint8["category_index"], as_float["category_index"])
