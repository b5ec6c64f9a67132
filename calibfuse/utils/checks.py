"""Early checks of a config and its environment, before any model loads: required values, integers,
W&B credentials, and secrets that must never reach a config, a run dir or a logger."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from calibfuse.utils.run import SECRET_KEY


def wandb_key_problem(key: str) -> str | None:
    """What is wrong with the shape of a W&B API key, or None. The rule of wandb's own check (0.31):
    40+ letters, digits or underscores, after an optional on-prem prefix ending in '-' ('local-...'),
    or a JWT. The message never holds the key itself."""
    if key != key.strip():
        return "it starts or ends with whitespace"
    if re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", key):  # a JWT (W&B's internal clients)
        return None
    secret = key.split("-", 1)[-1]  # after an on-prem prefix such as 'local-'
    if not re.fullmatch(r"[\w-]+", secret):
        return "it holds characters other than letters, digits, underscores and dashes"
    if len(secret) < 40:
        return f"it has {len(secret)} characters after any prefix, not 40 or more"
    return None


def wandb_key() -> tuple[str | None, str]:
    """The W&B API key wandb would use (WANDB_API_KEY first, then the netrc entry of its host) and where it is."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"], "WANDB_API_KEY"
    import netrc
    from urllib.parse import urlparse

    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    if not path.is_file():
        return None, ""
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as e:  # a syntax message may quote a token of the file: then only its line is named
        detail = f"line {e.lineno}" if e.lineno else e.msg
        raise RuntimeError(f"{path} cannot be parsed ({detail}); expected a netrc file as `wandb login` writes it") from None
    return (entry[2], f"the {host} entry of {path}") if entry and entry[2] else (None, "")


def check_wandb_credentials(logger_cfg: DictConfig | None) -> None:
    """Fail before any work when an online W&B logger is configured without credentials, or with a
    key that cannot be one (checked offline, by shape: a revoked key is found only by W&B)."""
    for conf in (logger_cfg or {}).values():
        if conf is None or "WandbLogger" not in str(conf.get("_target_", "")):
            continue
        if conf.get("offline", False) or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            continue
        key, where = wandb_key()
        if key is None:
            raise RuntimeError(
                "logger.wandb.offline=false but no W&B credentials: set WANDB_API_KEY in the environment "
                "(or run `wandb login`), or keep the default offline mode and `wandb sync` later"
            )
        problem = wandb_key_problem(key)
        if problem is not None:
            raise RuntimeError(
                f"logger.wandb.offline=false but the W&B API key in {where} is malformed: {problem}; expected 40 or more "
                "letters, digits or underscores (optionally after an on-prem prefix such as 'local-'), as shown at "
                "https://wandb.ai/authorize"
            )
        verify_wandb_key(key, where)


def verify_wandb_key(key: str, where: str, timeout: int = 20) -> None:
    """Ask W&B whether the key is valid, so a revoked key or an unreachable server stops the run before
    any work rather than when it logs at the end."""
    import socket
    from urllib.parse import urlparse

    import wandb

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:  # without a network wandb reports a refused key: tell the two apart first
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise RuntimeError(f"logger.wandb.offline=false but W&B's host {host} does not resolve ({e}); keep offline mode and `wandb sync` later") from None
    try:
        wandb.login(key=key, verify=True, relogin=True, timeout=timeout, prompt=False)
    except wandb.errors.AuthenticationError as e:
        raise RuntimeError(
            f"logger.wandb.offline=false but W&B refused the API key in {where} ({e}); expected a valid key from https://wandb.ai/authorize"
        ) from None
    except (wandb.errors.CommError, OSError) as e:
        raise RuntimeError(f"logger.wandb.offline=false but W&B is unreachable ({e}); keep the default offline mode and `wandb sync` later") from None


def leaves(node: Any, path: str = ""):
    """(dotted path, key, value) of every leaf of a plain nested container (OmegaConf.to_container)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, (dict, list)):
            yield from leaves(value, where)
        else:
            yield where, key, value


def check_required(cfg: DictConfig) -> None:
    """Fail before any work when a required value (`???` in conf/) is still unset, naming each key."""
    from omegaconf.errors import MissingMandatoryValue

    missing = [where for where, _, value in leaves(OmegaConf.to_container(cfg, resolve=False)) if value == "???"]
    if missing:
        raise MissingMandatoryValue(
            f"required config value{'s' if len(missing) > 1 else ''} not set: {', '.join(missing)} (??? in the config); "
            f"expected {'each' if len(missing) > 1 else 'it'} on the command line, e.g. {missing[0]}=<value>"
        )


def check_int(key: str, value: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    """An integer config value (not a bool, not 2.5, not '5'), at least `minimum`; None allowed when optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
        raise ValueError(f"{key}={value!r}; expected {expected}")
    return value


def check_ints(cfg: DictConfig, rules: dict[str, tuple[int | None, bool]]) -> None:
    """check_int for every `key: (minimum, optional)` of `rules`, before anything uses them (a negative
    prompts.limit would slice from the end, batch_size=2.5 would fail deep inside a run)."""
    for key, (minimum, optional) in rules.items():
        check_int(key, OmegaConf.select(cfg, key), minimum, optional)


# Where each kind of secret belongs instead of a config (the first match of the key's path wins).
SECRET_HOMES = (
    ("wandb", "WANDB_API_KEY"),
    ("scorer", "PERSPECTIVE_API_KEY (or the variable scorer.api_key_env names)"),
    ("perspective", "PERSPECTIVE_API_KEY"),
    ("hf", "HF_TOKEN"),
    ("hub", "HF_TOKEN"),
)


def secret_keys(overrides: list[str], config: DictConfig | None = None) -> list[str]:
    """Secret-looking keys (SECRET_KEY) holding a literal value in `config` or set by `overrides`, also
    inside their values (`logger.wandb={api_key:..}`, `evaluate_overrides=['scorer.api_key=..']`). An
    interpolation such as ${oc.env:WANDB_API_KEY} is fine: only the variable's name is saved."""
    found = (
        []
        if config is None
        else [
            where
            for where, key, value in leaves(OmegaConf.to_container(config, resolve=False))
            if SECRET_KEY.search(str(key)) and value not in (None, "", "???") and not str(value).startswith("${")
        ]
    )
    for override in overrides:  # `key=value` and `key: value` pairs whose value is not an interpolation
        for key in re.findall(r"([A-Za-z_][\w.\-/@]*)\s*[=:]\s*(?!\$\{)", str(override)):
            if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and not any(f == key or f.endswith("." + key) for f in found):
                found.append(key)
    return list(dict.fromkeys(found))


class RefuseSecretsInConfig(Callback):
    """Hydra callback (conf/hydra/default.yaml): refuse a run whose overrides or config hold a secret.
    Hydra writes the overrides and the config verbatim into the run dir's .hydra/ before the task
    starts, and W&B records the command line, so the run is stopped here, before anything is written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.refuse(config)
        self.writable(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.refuse(config)
        self.writable(config, "hydra.sweep.dir")

    @staticmethod
    def writable(config: DictConfig, key: str) -> None:
        """The run dir's nearest existing ancestor must be a writable directory (Hydra would fail with a
        raw FileNotFoundError). Read unresolved: ${run_id:} must be resolved once, by Hydra."""
        _, group, name = key.split(".")
        text = str(OmegaConf.to_container(config.hydra[group], resolve=False)[name])
        path = Path(text.split("${", 1)[0] or ".").expanduser().absolute()
        while not path.exists():
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK):
            what = "a file" if not path.is_dir() else "not writable"
            raise SystemExit(f"Error: {key}={text!r} cannot be made: {str(path)!r} is {what}; expected a path under a writable directory")

    @staticmethod
    def refuse(config: DictConfig) -> None:
        overrides = OmegaConf.to_container(config.hydra.overrides, resolve=False)  # as typed: ${...} unresolved
        keys = secret_keys([*overrides["task"], *overrides["hydra"]], config)
        if not keys:
            return
        homes = [next((home for word, home in SECRET_HOMES if word in key.lower()), "an environment variable") for key in keys]
        # SystemExit, not an exception: Hydra turns a callback's exception into a warning and runs on.
        raise SystemExit(
            f"Error: refusing to run: {', '.join(keys)} would be saved verbatim in the run dir (.hydra/overrides.yaml, "
            f"config.yaml) and in the W&B run's command line; expected secrets only from the environment: set "
            f"{', '.join(dict.fromkeys(homes))} instead, and drop the key from the command line and the config"
        )


def check_accelerator(trainer: DictConfig | dict | None, where: str = "trainer") -> None:
    """A trainer that asks for a GPU on a machine without one fails here, before any model loads
    (Lightning would say so only when the Trainer is built)."""
    accelerator = str((trainer or {}).get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"{where}.accelerator={accelerator}, but no CUDA GPU is visible; expected trainer=cpu here, or a machine with a GPU")


def check_output_dir(path: str | Path, key: str) -> Path:
    """A directory calibfuse must write to: made if missing; an existing file, or a place it cannot
    write, is named with the key that set it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key}={str(path)!r} is a file; expected a directory (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{key}={str(path)!r} cannot be made ({error.strerror}); expected a writable directory") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{key}={str(path)!r} is not writable; expected a writable directory")
    return path
