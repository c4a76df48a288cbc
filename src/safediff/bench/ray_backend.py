"""``--backend ray``: the same batches as the local backend, spread over Ray actors (optional extra
``safediff[ray]``).

Each actor is one ``Worker`` (model, guard and detectors loaded once) running torch with one thread; the driver
hands every idle actor the next pending batch and writes finished batches to the run folder itself (one writer).
A batch's bytes depend only on the protocol and the batch, so results equal the local backend's run at the same
torch thread count (1), in whatever order batches finish.
"""

from __future__ import annotations

import os

from safediff.bench.worker import Worker
from safediff.errors import SafediffError

PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "SAFEDIFF_CACHE", "XDG_CACHE_HOME")


class RayBackend:
    def __init__(self, spec: dict, workers: int):
        try:
            import ray
        except ImportError:
            raise SafediffError("--backend ray needs the optional extra: pip install safediff[ray]") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
            self.started = True
        actor = ray.remote(num_cpus=1)(Worker)
        self.actors = [actor.remote({**spec, "threads": 1}) for _ in range(workers)]

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, SafediffError):
                raise SafediffError(str(cause)) from None
            raise

    def protocol(self) -> dict:
        found = self._get([a.protocol.remote() for a in self.actors])
        if any(p != found[0] for p in found[1:]):
            raise SafediffError("Ray workers disagree on the protocol (different installs on different nodes?)")
        return found[0]

    def map(self, pending: list[int], batches: list[list[dict]]):
        """Yield (batch id, outputs) as batches finish, keeping every actor busy with one batch."""
        todo = list(pending)
        running = {}
        for actor in self.actors:
            if todo:
                b = todo.pop(0)
                running[actor.run.remote(batches[b])] = (b, actor)
        while running:
            ready, _ = self.ray.wait(list(running), num_returns=1)
            b, actor = running.pop(ready[0])
            outputs = self._get(ready[0])
            if todo:
                nb = todo.pop(0)
                running[actor.run.remote(batches[nb])] = (nb, actor)
            yield b, outputs

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()
