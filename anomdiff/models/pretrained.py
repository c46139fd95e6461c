"""Pretrained initialisation from a diffusers-format model (Stable Diffusion layout).

``model.pretrained`` is a local folder with ``unet/`` and ``vae/`` subfolders (what
``save_pretrained`` or ``huggingface-cli download`` writes) or a Hugging Face Hub id. Paths
(absolute, ``./``, ``../``, ``~``) are never sent to the Hub: a missing folder is an error at once.
DiAD initialises the SG network from the pretrained UNet; the caller does that with the UNet here.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel


class PretrainedNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for and cannot be found."""


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).exists()


def _load(cls, source: str, subfolder: str):
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise PretrainedNotFoundError(f"model.pretrained: folder {str(folder)!r} does not exist")
        if not (folder / subfolder / "config.json").is_file():
            raise PretrainedNotFoundError(
                f"model.pretrained: {str(folder)!r} has no {subfolder}/config.json; expected a diffusers-format "
                "folder with unet/ and vae/ subfolders"
            )
        return cls.from_pretrained(str(folder), subfolder=subfolder)
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as exc:  # hub errors subclass OSError; diffusers adds ValueError
        raise PretrainedNotFoundError(
            f"model.pretrained: could not load {subfolder!r} of {source!r} from the Hugging Face Hub or its local "
            f"cache ({type(exc).__name__}: {exc}). Without network, download it elsewhere "
            f"(huggingface-cli download {source}) and set model.pretrained to the folder."
        ) from exc


def load_pretrained(source: str) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The pretrained UNet and VAE of a diffusers-format model folder or Hub id."""
    return _load(UNet2DConditionModel, source, "unet"), _load(AutoencoderKL, source, "vae")
