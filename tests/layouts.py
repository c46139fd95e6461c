"""Builders of small source trees in each public layout, written inside the tests' tmp folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 40


def write_image(path: Path, seed: int, size: int = SIZE, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_mask(path: Path, size: int = SIZE, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = value
    Image.fromarray(mask).save(path)
    return path


def mvtec_tree(root: Path, categories=("bottle", "grid"), train=3, good=2, defects=("crack",), per_defect=2) -> Path:
    """``<cat>/train/good``, ``<cat>/test/<defect>``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``;
    ``grid`` is grayscale as in MVTec AD, and a licence file sits at the root."""
    (root / "license.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    seed = 0
    for cat in categories:
        mode = "L" if cat == "grid" else "RGB"
        for i in range(train):
            write_image(root / cat / "train" / "good" / f"{i:03d}.png", seed := seed + 1, mode=mode)
        for i in range(good):
            write_image(root / cat / "test" / "good" / f"{i:03d}.png", seed := seed + 1, mode=mode)
        for defect in defects:
            for i in range(per_defect):
                write_image(root / cat / "test" / defect / f"{i:03d}.png", seed := seed + 1, mode=mode)
                write_mask(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def visa_tree(root: Path, categories=("candle", "pcb1"), train=3, test_normal=1, test_anomaly=2) -> Path:
    """``split_csv/1cls.csv`` with object,split,label,image,mask; masks hold class ids (here 1), not 255."""
    rows, seed = [], 0
    for cat in categories:
        for split, label, n in (("train", "normal", train), ("test", "normal", test_normal),
                                ("test", "anomaly", test_anomaly)):
            for i in range(n):
                kind = "Normal" if label == "normal" else "Anomaly"
                image = f"{cat}/Data/Images/{kind}/{split}{i:03d}.JPG"
                write_image(root / image, seed := seed + 1)
                mask = ""
                if label == "anomaly":
                    mask = f"{cat}/Data/Masks/Anomaly/{split}{i:03d}.png"
                    write_mask(root / mask, value=1)
                rows.append({"object": cat, "split": split, "label": label, "image": image, "mask": mask})
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def realiad_tree(root: Path, categories=("audiojack", "toy"), resolution=64) -> Path:
    """``realiad_jsons/realiad_jsons/<cat>.json`` and images under ``realiad_<res>/<cat>/``."""
    json_dir = root / "realiad_jsons" / "realiad_jsons"
    json_dir.mkdir(parents=True, exist_ok=True)
    seed = 0
    for cat in categories:
        entries = {"train": [], "test": []}
        for split, cls, n in (("train", "OK", 3), ("test", "OK", 1), ("test", "AK", 2)):
            for i in range(n):
                folder = "OK" if cls == "OK" else "NG"
                stem = f"{cat}_{i:04d}_{folder}_{split}_C{(i % 5) + 1}_2023102109{i:04d}"
                image = f"{folder}/S{i:04d}/{stem}.jpg"
                write_image(root / f"realiad_{resolution}" / cat / image, seed := seed + 1)
                mask = None
                if cls != "OK":
                    mask = f"{folder}/S{i:04d}/{stem}.png"
                    write_mask(root / f"realiad_{resolution}" / cat / mask)
                entries[split].append({"category": cat, "anomaly_class": cls, "image_path": image,
                                       "mask_path": mask})
        (json_dir / f"{cat}.json").write_text(json.dumps({"meta": {"prefix": ""}, **entries}))
    return root


def folder_tree(root: Path, categories=("widget",), good=10, defects=("dent",), per_defect=2) -> Path:
    """``<cat>/good/*``, ``<cat>/<defect>/*``, ``<cat>/masks/<defect>/*``."""
    seed = 0
    for cat in categories:
        for i in range(good):
            write_image(root / cat / "good" / f"g{i:03d}.png", seed := seed + 1)
        for defect in defects:
            for i in range(per_defect):
                write_image(root / cat / defect / f"d{i:03d}.png", seed := seed + 1)
                write_mask(root / cat / "masks" / defect / f"d{i:03d}.png")
    return root
