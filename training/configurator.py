"""Training configuration: defaults, then Python config files, then ``--key=value``.

nanoGPT's convention, made strict: every key must already exist in the defaults, and a
value must have the default's type (an int is accepted where a float is expected). A
mistake stops the run with a ``ConfigError`` naming the key, instead of silently training
something else. Config files are plain Python (``n_layer = 24``, ``import os`` ...), so
the original repository's files run unchanged; names they bind to modules, functions or
classes are ignored.

The original repository's config files and training script also carry keys that this
implementation does not need (``dropout``, ``bias``, init knobs, ...). They are accepted when
they ask for what this code does anyway (or change nothing in the original either), and
refused with an explanation when they ask for something else; its encoding knobs
(``grape_*``, ``keygated_*``, ``querygated_*``, ``querykeygated_*``, ``p_*``) are GPTConfig
fields with the original's meaning (``grape_base`` and ``grape_share_across_heads`` renamed).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import types
from typing import Any, Iterable, Optional

from model import GPTConfig, settings_from_model_type


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


# -- types ------------------------------------------------------------------------------

_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _parse_annotation(annotation: str) -> tuple:
    """'Optional[int]' / 'int | None' / 'float' -> tuple of python types; a sequence of ints
    ('tuple[int, ...]', 'list[int]', e.g. grid=(16, 16)) is accepted as ``tuple``."""
    text = annotation.replace(" ", "").replace("NoneType", "None")
    for wrapper in ("Optional[", "Union["):
        if text.startswith(wrapper) and text.endswith("]"):
            inner = _parse_annotation_list(text[len(wrapper):-1])
            return inner + ((type(None),) if wrapper == "Optional[" else ())
    if text in ("tuple[int,...]", "list[int]"):
        return (tuple,)
    try:
        return tuple(_TYPE_NAMES[part] for part in text.split("|"))
    except KeyError:
        raise TypeError(f"cannot check config values of type {annotation!r}") from None


def _parse_annotation_list(text: str) -> tuple:
    """The types of 'A,B[...],C' (commas inside brackets belong to their part)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return tuple(dict.fromkeys(t for part in parts for t in _parse_annotation(part)))


def model_fields() -> dict[str, tuple[Any, tuple]]:
    """GPTConfig's own fields (not PretrainedConfig's): name -> (default, accepted types)."""
    own = inspect.get_annotations(GPTConfig)
    fields = {}
    for f in dataclasses.fields(GPTConfig):
        if f.name in own and not f.name.startswith("_"):
            annotation = f.type if isinstance(f.type, str) else (
                f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", ""))
            fields[f.name] = (f.default, _parse_annotation(annotation))
    return fields


def types_of(defaults: dict) -> dict[str, tuple]:
    """Accepted types for each default, from the default's own type (nanoGPT style)."""
    return {k: (type(v),) for k, v in defaults.items()}


def check_value(key: str, value: Any, accepted: tuple) -> Any:
    """The value, converted int -> float where a float is expected; ConfigError otherwise."""
    if isinstance(value, bool):
        if bool in accepted:
            return value
    elif isinstance(value, int) and int in accepted:
        return value
    elif isinstance(value, (int, float)) and float in accepted:
        if not math.isfinite(value):              # nan passes every `< 0` check and trains on nothing
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    elif value is None and type(None) in accepted:
        return value
    elif isinstance(value, str) and str in accepted:
        return value
    elif (isinstance(value, (tuple, list)) and tuple in accepted
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    names = " or ".join("None" if t is type(None) else t.__name__ for t in accepted)
    raise ConfigError(f"config key {key!r} expects {names}, got {value!r} ({type(value).__name__})")


def parse_text(key: str, text: str, accepted: tuple) -> Any:
    """The value of a command-line ``--key=text`` (Python literal syntax, as in nanoGPT)."""
    if bool in accepted and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text                      # a bare word is a string: --out_dir=out-run1
    if str in accepted and not isinstance(value, str):
        value = text                      # --wandb_run_name=123 is the string '123'
    return check_value(key, value, accepted)


# -- keys of the original repository -----------------------------------------------------

# key -> (the value this implementation has built in, why). Other values are refused.
FIXED_KEYS = {
    "dropout": (0.0, "this model has no dropout"),
    "bias": (False, "this model has no bias terms"),
    "use_fp32_rmsnorm": (True, "RMSNorm always computes in float32 here"),
    "embedding_init_std": (0.02, "the embedding is initialised with std 0.02 (SPEC §2)"),
    "hidden_init_std_factor": (0.5, "hidden matrices are initialised with std 0.5/sqrt(n_embd) (SPEC §2)"),
    "optimizer_name": ("adamw", "this script trains with AdamW"),
}
# Keys the original repository defines that change nothing there either: accepted with a note.
NO_EFFECT_KEYS = {
    "scale_attn_by_inverse_layer_idx": "the original's configs pass it to the model, but none of its model files reads it",
    "rho": "defined by the original's training script, which never reads it (it trains with AdamW)",
    "interval": "defined by the original's training script, which never reads it (it trains with AdamW)",
    "variant": "defined by the original's training script, which never reads it (it trains with AdamW)",
}
# Keys of variants that do not exist here: refused.
REFUSED_KEYS = {
    "tpa_kvrank": "tensor-product attention (TPA) is not implemented here",
    "tpa_qrank": "tensor-product attention (TPA) is not implemented here",
    "group_size": "grouped-query attention (GQA) is not implemented here (every model is multi-head)",
}
# Keys renamed since the original repository: old -> (new, convert).
RENAMED_KEYS = {
    "grape_base": ("rope_base", lambda v: v),
    "grape_share_across_heads": ("grape_m_per_head", lambda v: not v),
}
P_TIE_ALIASES = {"pqtie": "pq", "pktie": "pk", "pvtie": "pv"}


class Config(dict):
    """The resolved training configuration; ``cfg.key`` reads ``cfg['key']``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


class Configurator:
    """Collects overrides on top of ``defaults`` with a type check on every key."""

    def __init__(self, defaults: dict, accepted: Optional[dict] = None):
        self.values = dict(defaults)
        self.accepted = accepted if accepted is not None else types_of(defaults)
        self.explicit: set[str] = set()       # keys set by a file or the command line
        self.notes: list[str] = []

    def set(self, key: str, value: Any, source: str) -> None:
        if key in FIXED_KEYS:
            fixed, why = FIXED_KEYS[key]
            if value != fixed:
                raise ConfigError(f"config key {key!r} = {value!r} (from {source}) is not supported: "
                                  f"{why}; only {fixed!r} is accepted")
            return
        if key in NO_EFFECT_KEYS:
            self.notes.append(f"note: config key {key!r} (from {source}) has no effect: {NO_EFFECT_KEYS[key]}")
            return
        if key in REFUSED_KEYS:
            raise ConfigError(f"config key {key!r} (from {source}) is not supported: {REFUSED_KEYS[key]}")
        if key in RENAMED_KEYS:
            new, convert = RENAMED_KEYS[key]
            key, value = new, convert(value)
        if key not in self.values:
            raise ConfigError(f"unknown config key {key!r} (from {source}); "
                              f"see the defaults at the top of train_adam_finewebedu.py")
        value = check_value(key, value, self.accepted[key])
        if key == "p_tie_mode":
            value = P_TIE_ALIASES.get(value, value)
        self.values[key] = value
        self.explicit.add(key)

    def apply_file(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        source = read_config_text(path)
        # the file sees the current values, as in nanoGPT (so `60 // batch_size` works)
        namespace = _RecordingNamespace(self.values)
        namespace["__file__"] = os.path.abspath(path)   # lets a file exec a shared base next to it
        run_config_file(source, path, namespace)
        for key in namespace.assigned:
            if key not in namespace:
                continue                 # assigned, then deleted
            value = namespace[key]
            if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                continue
            self.set(key, value, path)

    def apply_argument(self, arg: str) -> None:
        key, sep, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ConfigError(f"command-line override {arg!r} must look like --key=value")
        if key in self.values:
            accepted = self.accepted[key]
        elif key in RENAMED_KEYS:
            accepted = self.accepted[RENAMED_KEYS[key][0]]
        elif key in FIXED_KEYS:
            accepted = (type(FIXED_KEYS[key][0]),)
        elif key in NO_EFFECT_KEYS or key in REFUSED_KEYS:
            accepted = (int, float, bool, str, type(None))
        else:
            raise ConfigError(f"unknown config key {key!r} (from the command line); "
                              f"see the defaults at the top of train_adam_finewebedu.py")
        self.set(key, parse_text(key, text, accepted), "the command line")

    def apply(self, argv: Iterable[str]) -> None:
        """Config files and ``--key=value`` in order: later ones win."""
        for arg in argv:
            if arg.startswith("--"):
                self.apply_argument(arg)
            else:
                self.apply_file(arg)


def read_config_text(path: str) -> str:
    """A config file's text; bytes that are not UTF-8 are a ConfigError naming the place."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                          "save it as UTF-8") from None


def run_config_file(source: str, path: str, namespace: dict) -> None:
    """Execute a config file; anything it raises (a syntax error, a missing import, a name
    it does not define) is a ConfigError naming the file and line."""
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"config file {path!r}, line {e.lineno}: {e.msg}") from None
    try:
        exec(code, namespace)
    except ConfigError:
        raise                                    # from a base file it execs: already names that file
    except Exception as e:
        line = next((tb.tb_lineno for tb in _frames_in(e.__traceback__, path)), "?")
        what = (f"{e.msg} (line {e.lineno} of the code it executes)" if isinstance(e, SyntaxError)
                else f"{type(e).__name__}: {e}")
        raise ConfigError(f"config file {path!r}, line {line}: {what}") from None


def _frames_in(tb, path: str):
    """The traceback's frames that run the file ``path``, innermost first."""
    frames = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            frames.append(tb)
        tb = tb.tb_next
    return reversed(frames)


class _RecordingNamespace(dict):
    """A config file's namespace that remembers, in order, every name the file assigns,
    also inside a shared base it execs (``exec(open(...).read())`` writes into the same
    namespace); a key set to its default value still counts as set."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.assigned: dict[str, None] = {}

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.assigned[key] = None


def resolve_model_type(values: dict, explicit: set[str]) -> None:
    """Map the original repository's ``model_type`` onto ``pos_encoding`` and KV-shift.

    KV-shift is on if the name says so *or* the file sets ``use_k_shift``/``use_v_shift``
    (the original kv-shift configs keep the plain model_type and set the two flags).
    """
    model_type = values.get("model_type") or ""
    if not model_type:
        return
    try:
        settings = settings_from_model_type(model_type)
    except ValueError as e:
        raise ConfigError(f"config key 'model_type': {e}") from None
    if "pos_encoding" in explicit and values["pos_encoding"] != settings["pos_encoding"]:
        raise ConfigError(f"config keys disagree: model_type={model_type!r} means pos_encoding="
                          f"{settings['pos_encoding']!r}, but pos_encoding={values['pos_encoding']!r}")
    values["pos_encoding"] = settings["pos_encoding"]
    for flag in ("use_k_shift", "use_v_shift"):
        values[flag] = values[flag] or settings[flag]


def resolve_seeds(values: dict) -> None:
    """data_seed and eval_seed < 0 take the value of seed (the original's convention)."""
    for key in ("data_seed", "eval_seed"):
        if key in values and values[key] < 0:
            values[key] = values["seed"]


def configure(argv: Iterable[str], defaults: dict, accepted: Optional[dict] = None,
              verbose: bool = True) -> tuple[Config, set[str]]:
    """Resolve ``defaults`` + config files + ``--key=value`` into a Config.

    Returns the config and the set of keys set explicitly."""
    c = Configurator(defaults, accepted)
    c.apply(argv)
    resolve_model_type(c.values, c.explicit)
    resolve_seeds(c.values)
    if verbose:
        for note in dict.fromkeys(c.notes):
            print(note)
    return Config(c.values), c.explicit
