"""The endpoint's settings, typed: frozen dataclasses for `conf/serve.yaml`, checked in one place.

`ServeSettings.from_config(cfg)` collects every problem into one `ConfigError`, each naming the
setting and the fix, before anything starts. The model, prompt and engine sections are the batch
job's own types (`pipeline.generate.settings`), so a request renders and samples as a batch row
does; `preparer_settings` hands them to the job's `preparer_for`.

Pure module: standard library, and omegaconf when given a Hydra config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.generate.settings import (
    ConfigError,
    EngineSettings,
    GenerationSettings,
    LoraLimits,
    OutputSettings,
    request_defaults_problems,
)
from pipeline.model_settings import ModelSettings, PromptSettings
from pipeline.settings_common import absolute, build, model_path_of, to_plain

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class AuthSettings:
    """Bearer-token auth (`auth:`)."""

    token_env: str = "LLAMA_BATCH_SERVE_TOKEN"
    """The environment variable holding the token (the token itself is never in the config or a log)."""
    required: str | bool = "auto"
    """auto: when the host is not a loopback address; true: always; false: never."""


@dataclass(frozen=True)
class Limits:
    """What the server takes on at once (`limits:`)."""

    max_pending: int = 256
    """Requests admitted at once (running and queued); more are answered HTTP 429."""
    max_body_bytes: int = 1_048_576
    """Request bodies above this are answered HTTP 413."""
    shutdown_grace_s: float = 30
    """On SIGTERM: seconds to finish the requests in flight before stopping."""


@dataclass(frozen=True)
class ReplicaSettings:
    """Ray Serve replicas (`serve:`)."""

    replicas: int = 0
    """0: one engine in this process (uvicorn); N: N replicas through Ray Serve."""
    num_gpus: float | None = None
    """GPUs per replica; null: 1 when the cluster has GPUs, else 0."""
    num_cpus: float = 1
    """CPUs per replica."""
    ray_address: str | None = None
    """null: start Ray here; "auto" or an address joins a cluster."""


@dataclass(frozen=True)
class ServeSettings:
    """The whole endpoint (conf/serve.yaml)."""

    model: ModelSettings
    engine: EngineSettings
    host: str = "127.0.0.1"
    port: int = 8000
    seed: int = 0
    """Requests without their own seed are seeded from this and their request id."""
    request_defaults: dict = field(default_factory=dict)
    """Request fields for requests that give none of their own."""
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: Limits = field(default_factory=Limits)
    adapters: bool = True
    """Serve `lora` by name from `lora_root` (the engine starts with LoRA enabled)."""
    serve: ReplicaSettings = field(default_factory=ReplicaSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    lora_root: str = "lora"
    """The adapter registry (absolute once checked)."""

    @classmethod
    def from_config(cls, cfg, environ: dict | None = None) -> "ServeSettings":
        """Build and check the settings from the composed Hydra config (or a plain dict);
        `environ` (default: the process's) is where the auth token is looked for."""
        s = to_plain(cfg)
        problems = _problems(s, os.environ if environ is None else environ)
        if problems:
            raise ConfigError(problems)
        model = s["model"]
        model_path, problem = model_path_of(model)
        if problem:
            raise ConfigError([problem])
        engine = dict(s["engine"])
        engine["lora"] = build(LoraLimits, engine.get("lora") or {})
        return cls(
            model=build(ModelSettings, {**model, "path": model_path}),
            engine=build(EngineSettings, engine),
            host=s.get("host", "127.0.0.1"),
            port=s.get("port", 8000),
            seed=s.get("seed", 0),
            request_defaults=dict(s.get("request_defaults") or {}),
            auth=build(AuthSettings, s.get("auth") or {}),
            limits=build(Limits, s.get("limits") or {}),
            adapters=bool(s.get("adapters", True)),
            serve=build(ReplicaSettings, s.get("serve") or {}),
            prompt=build(PromptSettings, s.get("prompt") or {}),
            lora_root=absolute(s.get("lora_root") or "lora"),
        )

    @property
    def auth_required(self) -> bool:
        return auth_required(self.auth.required, self.host)

    def preparer_settings(self) -> GenerationSettings:
        """The batch job's settings as far as they shape a request's prompt, seed and sampling
        (what `pipeline.generate.tasks.preparer_for` reads): the endpoint prepares requests with
        the job's own preparer. Label probabilities are a batch column; the endpoint has none."""
        return GenerationSettings(
            input=(), output=OutputSettings(path=""), model=self.model, engine=self.engine, seed=self.seed,
            request_defaults=dict(self.request_defaults), prompt=self.prompt, lora_root=self.lora_root,
            label_probs=False,
        )

    def record(self) -> dict:
        """The settings as they may be logged (the token is never part of them)."""
        return dataclasses.asdict(self)


def auth_required(required: str | bool, host: str) -> bool:
    if required == "auto":
        return host not in LOOPBACK_HOSTS
    return bool(required)


def _problems(s: dict, environ) -> list[str]:
    """Every problem with the composed config, each naming the setting and the fix."""
    problems: list[str] = []

    def need_int(path: str, value: Any, minimum: int, maximum: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
                maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            problems.append(f"{path}: must be an integer {bound} (got {value!r})")

    def need_positive(path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{path}: must be a number > 0 (got {value!r})")

    host = s.get("host")
    if not isinstance(host, str) or not host:
        problems.append(f"host: must be an address to listen on, e.g. 127.0.0.1 (got {host!r})")
    need_int("port", s.get("port"), 0, 65535)
    need_int("seed", s.get("seed"), 0)
    limits = s.get("limits") or {}
    need_int("limits.max_pending", limits.get("max_pending"), 1)
    need_int("limits.max_body_bytes", limits.get("max_body_bytes"), 1024)
    need_positive("limits.shutdown_grace_s", limits.get("shutdown_grace_s"))
    if not isinstance(s.get("adapters", True), bool):
        problems.append(f"adapters: must be true or false (got {s.get('adapters')!r})")
    replicas = s.get("serve") or {}
    need_int("serve.replicas", replicas.get("replicas", 0), 0)
    need_positive("serve.num_cpus", replicas.get("num_cpus", 1))
    auth = s.get("auth") or {}
    required, token_env = auth.get("required", "auto"), auth.get("token_env")
    if required not in ("auto", True, False):
        problems.append(f"auth.required: must be auto, true or false (got {required!r})")
    if not isinstance(token_env, str) or not token_env:
        problems.append(f"auth.token_env: must name an environment variable (got {token_env!r})")
    elif isinstance(host, str) and required in ("auto", True) and auth_required(required, host) \
            and not environ.get(token_env):
        why = f"host={host} listens beyond this machine" if required == "auto" else "auth.required=true"
        problems.append(f"auth: {why}, so requests need a bearer token: set the environment variable "
                        f"{token_env} (auth.token_env) to the token clients will send, or listen on "
                        "host=127.0.0.1, or set auth.required=false to serve without one")
    engine, model = s.get("engine") or {}, s.get("model") or {}
    need_int("engine.max_model_len", engine.get("max_model_len"), 16)
    need_int("engine.tensor_parallel_size", engine.get("tensor_parallel_size"), 1)
    if engine.get("kv_cache_gib") is not None:
        need_positive("engine.kv_cache_gib", engine.get("kv_cache_gib"))
    lora = engine.get("lora") or {}
    need_int("engine.lora.max_rank_limit", lora.get("max_rank_limit", 64), 1)
    need_int("engine.lora.max_loras_limit", lora.get("max_loras_limit", 4), 1)
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    if model.get("build") not in (None, "tiny", "tiny-awq"):
        problems.append(f"model.build: must be null, tiny or tiny-awq (got {model.get('build')!r})")
    problems.extend(request_defaults_problems(s.get("request_defaults")))
    return problems
