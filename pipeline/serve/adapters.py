"""The endpoint's adapters: `lora` names resolved through the registry on first use, with the
batch job's own checks (`pipeline.generate.config.adapter_entry`: base model, prompt date, rank).

A usable adapter is remembered for the server's life (vLLM loads its weights on the first request
that names it, keyed by the adapter's stable `lora_int_id`); a refused one is looked up again on
the next request, so an adapter published while the server runs is served without a restart. An
adapter retrained under the same name is served from its first version until the server restarts.

Pure module: the registry is files on disk.
"""

from __future__ import annotations

import threading

from pipeline.generate.config import adapter_entry
from pipeline.lora_registry import AdapterRegistry
from pipeline.model_settings import ModelSettings


class ServedAdapters:
    """Registry adapters as the engine may load them, by name."""

    def __init__(self, root: str, base: ModelSettings, date_string: str | None, max_rank: int, enabled: bool = True):
        self.registry = AdapterRegistry(root)
        self.base, self.date_string, self.max_rank, self.enabled = base, date_string, max_rank, enabled
        self.usable: dict[str, dict] = {}
        self._lock = threading.Lock()

    def entry(self, name: str) -> dict:
        """{"path", "lora_int_id", "rank", "fingerprint"} for a usable adapter, else {"error", "reason"}."""
        if not self.enabled:
            return {"error": "adapters are not served here (adapters=false)", "reason": "disabled"}
        with self._lock:
            if name in self.usable:
                return self.usable[name]
            entry = adapter_entry(self.registry, name, self.base, self.date_string, self.max_rank)
            if "error" not in entry:
                self.usable[name] = entry
            return entry

    def check(self, name: str) -> None:
        """The preparer's `resolve_lora`: raises ValueError with the batch job's text for a name
        that cannot be served (`pipeline.generate.config.check_adapter_request`)."""
        entry = self.entry(name)
        if "error" in entry:
            raise ValueError(entry["error"])

    def listing(self) -> list[dict]:
        """The registry's adapters, for the playground's picker: name, base model, rank, and
        whether this server can load each (the reason when not)."""
        out = []
        for adapter in self.registry.list() if self.enabled else []:
            entry = self.entry(adapter.name)
            out.append({"name": adapter.name, "base_model": adapter.base_model, "rank": adapter.rank,
                        "usable": "error" not in entry, "error": entry.get("error")})
        return out
