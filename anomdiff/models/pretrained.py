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


def _load(cls, source: str, subfolder: str, key: str):
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise PretrainedNotFoundError(f"{key}: folder {str(folder)!r} does not exist")
        if not (folder / subfolder / "config.json").is_file():
            raise PretrainedNotFoundError(
                f"{key}: {str(folder)!r} has no {subfolder}/config.json; expected a diffusers-format "
                "folder with unet/ and vae/ subfolders"
            )
        return cls.from_pretrained(str(folder), subfolder=subfolder)
    try:
        return cls.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as exc:  # hub errors subclass OSError; diffusers adds ValueError
        raise PretrainedNotFoundError(
            f"{key}: could not load {subfolder!r} of {source!r} from the Hugging Face Hub or its local "
            f"cache ({type(exc).__name__}: {exc}). Without network, download it elsewhere "
            f"(huggingface-cli download {source}) and set {key} to the folder."
        ) from exc


def _hub_problem(repo: str, filename: str) -> str | None:
    """Why ``filename`` of Hub repo ``repo`` cannot be had, or ``None``: the local cache is looked at
    first; the Hub only when its host answers within seconds (huggingface_hub itself retries an
    unreachable host for about 20 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "not in the local cache, and HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as exc:
        return f"not in the local cache, and {endpoint.hostname} cannot be reached: {exc}"
    try:
        hf_hub_download(repo, filename, etag_timeout=10)
    except Exception as exc:  # unknown or gated repo, a proxy that refuses: the weights are out of reach
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _diffusers_problems(key: str, source: str) -> list[str]:
    """Why the diffusers-format model ``source`` (a folder or Hub id, named by config ``key``) cannot
    be loaded, checked without loading it."""
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (folder / sub / "config.json").is_file()]
        if missing:
            return [f"{key}: {str(folder)!r} has no {' or '.join(missing)}; point it at a diffusers-format "
                    "folder with unet/ and vae/ subfolders"]
        return []
    why = _hub_problem(source, "unet/config.json")
    if why:
        return [f"{key}: cannot get {source!r} ({why}). On a machine with network run "
                f"`huggingface-cli download {source} --include 'unet/*' 'vae/*' --local-dir DIR`, copy DIR here and "
                f"pass {key}=DIR (or {key}=null for random weights)"]
    return []


def pretrained_problems(cfg, diffusion: bool = True) -> list[str]:
    """What stands between a ``ModelConfig`` and the pretrained weights it asks for, checked without
    loading them (a config file of a few kB from the Hub at most): one line per problem, each naming
    the key to set. ``diffusion``: whether the method loads ``model.pretrained`` (SD's UNet and VAE;
    ``knn`` and ``proad`` use the backbone only). The training job calls this before Ray starts, so
    a machine without the weights fails at once."""
    problems = []
    if cfg.pretrained and diffusion:
        problems += _diffusers_problems("model.pretrained", cfg.pretrained)
    if cfg.method == "drdc" and cfg.drdc.space == "latent" and cfg.drdc.pretrained:
        problems += _diffusers_problems("model.drdc.pretrained", cfg.drdc.pretrained)
    if cfg.method == "drdc" and cfg.drdc.base_model:
        from anomdiff.models.saved import read_saved_config

        try:
            read_saved_config(Path(cfg.drdc.base_model).expanduser())
        except (OSError, ValueError) as exc:
            problems.append(f"model.drdc.base_model: {exc}")
    backbone = cfg.backbone
    if backbone.pretrained == "hub":
        import timm

        repo = timm.models.get_pretrained_cfg(backbone.name).hf_hub_id
        why = _hub_problem(repo, "config.json") if repo else "timm names no Hub weights for it"
        if why:
            problems.append(f"model.backbone.pretrained: cannot get the pretrained weights of {backbone.name} ({repo}; "
                            f"{why}). Download {repo}'s model.safetensors "
                            "elsewhere and pass model.backbone.pretrained=FILE (or null for random weights)")
    elif backbone.pretrained == "imagenet":
        from anomdiff.models.imagenet import packaged_file

        try:
            packaged_file(backbone.name)
        except ValueError as exc:
            problems.append(str(exc))
    elif backbone.pretrained and not Path(backbone.pretrained).expanduser().is_file():
        problems.append(f"model.backbone.pretrained: weights file {backbone.pretrained!r} does not exist")
    return problems


def load_pretrained(source: str, key: str = "model.pretrained") -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The pretrained UNet and VAE of a diffusers-format model folder or Hub id (``key``: the config key
    that named it, for the error)."""
    return _load(UNet2DConditionModel, source, "unet", key), _load(AutoencoderKL, source, "vae", key)
