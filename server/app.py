"""The aggregation server: schedules single-expert tasks over MQTT and aggregates per expert.

:class:`AggregationServer` only orchestrates; the work is in four places (the way Flower splits
``Server.fit_round``, the ``Strategy`` and the pure ``aggregate.py``):

- :mod:`edgehmoe.server.scheduler` — which device trains which expert (pure);
- :mod:`edgehmoe.server.registry` — the devices that announced themselves, online or not;
- :mod:`edgehmoe.server.rounds` — one round over an injected transport: publish the tasks,
  collect results until every asked device answered, refused or went offline, or the deadline
  passed; validate each result; FedAvg per expert (:func:`edgehmoe.fl.aggregation.aggregate_per_expert`);
- :mod:`edgehmoe.server.store` — the run directory and the commit: new weight files, a row in
  ``metrics.jsonl``, ``state.json`` by atomic rename (the commit point), ``model.json``. A
  crash at any moment leaves the last committed round intact; ``--resume`` continues after it,
  so no round is lost or repeated.

One round (see docs/design.md): plan, build the tasks, run them, aggregate, score the new
weights in memory on the validation split (when due), commit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from edgehmoe.server.config import RunConfig, dump_config
from edgehmoe.server.evalplan import eval_due
from edgehmoe.server.registry import Device, DeviceRegistry
from edgehmoe.server.rounds import (
    Pending,
    RoundRunner,
    Transport,
    UpdateRules,
    aggregate,
    connect_mqtt,
    metrics_row,
    node_name,
)
from edgehmoe.server.scheduler import FLAT, Scheduler
from edgehmoe.server.store import ModelInfo, RunDirError, RunState, RunStore

from edgehmoe.core.hierarchy import Hierarchy, routing_tree
from edgehmoe.errors import RunError
from edgehmoe.fl import wire
from edgehmoe.fl.aggregation import Weights

__all__ = ["AggregationServer", "RunDirError"]

logger = logging.getLogger(__name__)


class AggregationServer:
    """Runs a federated training job described by a :class:`RunConfig`.

    Args:
        cfg: the validated configuration.
        resume: continue an existing run directory from its last committed round.
        password: the broker password (read from ``cfg.broker.password_file`` if ``None``).
        stop: set this event to stop after the current round (clean shutdown).
        progress: called as ``progress(rounds_done, rounds_total, row)`` after every commit.
        transport: use this instead of connecting to ``cfg.broker`` (see
            :class:`edgehmoe.server.rounds.Transport`; the unit tests pass a fake).
        clock: wall-clock time source for deadlines (tests pass a fake).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, password: str | None = None,
                 stop: threading.Event | None = None, progress=None, transport: Transport | None = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.out = cfg.out_dir
        self.resume = resume
        self.stop = stop or threading.Event()
        self.progress = progress
        if password is None and cfg.broker.password_file:
            password = Path(cfg.broker.password_file).read_text().strip()
        self.password = password
        self.transport = transport
        self.clock = clock
        self.store = RunStore(self.out)
        self.state: RunState | None = None  # last committed state (set by prepare())
        self.weights: dict[int, Weights] = {}  # committed weights by node
        self.history: list[dict] = []  # metric rows of all committed rounds
        self.registry: DeviceRegistry | None = None
        self.scheduler: Scheduler | None = None
        self.runner: RoundRunner | None = None  # set by connect()
        self._label_maps: dict[int, np.ndarray] = {}  # node -> label map sent with its tasks
        self._nobody = False  # the last run_round found no online device to ask

    # ------------------------------------------------------------------ views
    @property
    def round(self) -> int:
        """The next round to run (= rounds committed)."""
        return self.state.round if self.state is not None else 0

    @property
    def files(self) -> dict[int, str]:
        return self.state.files if self.state is not None else {}

    @property
    def devices(self) -> dict[str, Device]:
        return self.registry.devices if self.registry is not None else {}

    @property
    def mean(self) -> list[float]:
        return self.state.mean

    @property
    def std(self) -> list[float]:
        return self.state.std

    # ------------------------------------------------------------------ set-up
    def _load_eval_data(self):
        from edgehmoe.data import channel_stats, load_dataset

        c = self.cfg.run
        val = load_dataset(c.dataset, c.eval_split, val_fraction=c.val_fraction, seed=c.seed)
        if len(val) > self.cfg.eval.max_examples > 0:
            idx = np.random.default_rng(c.seed).choice(len(val), self.cfg.eval.max_examples, replace=False)
            val = val.subset(np.sort(idx))
        mean, std = channel_stats(val.x)
        return val, mean, std

    def _specs(self, tree: Hierarchy, input_size: int) -> dict[int, dict]:
        from edgehmoe.model.arch import expert_specs, flat_spec

        m = self.cfg.model
        if m.kind == "flat":
            return {FLAT: flat_spec(tree, input_size, m.flat_width).to_dict()}
        specs = expert_specs(tree, input_size, flat_width=m.flat_width, min_width=m.min_width,
                             fixed_width=m.expert_width or None, root_width=m.root_width or None,
                             head=m.expert_head, root_stem_stride=m.root_stem_stride,
                             expert_stem_stride=m.expert_stem_stride)
        return {n: s.to_dict() for n, s in specs.items()}

    def prepare(self) -> None:
        """Create or resume the run directory and load/initialise all weights."""
        from edgehmoe.model.arch import (
            build_model,
            count_params,
            estimate_train_memory_mb,
        )
        from edgehmoe.model.training import state_arrays

        self.store.check(self.resume, self.cfg.run.name)  # before the (slow) data loading
        if self.resume:
            self._keep_run_architecture()
        self.val, mean, std = self._load_eval_data()
        self.tree = routing_tree(self.val.hierarchy, self.cfg.model.tree_groups)
        self.specs = self._specs(self.tree, self.val.image_size)
        self.memory_need = {n: estimate_train_memory_mb(s, self.cfg.train.batch_size) for n, s in self.specs.items()}
        self.params = {n: count_params(build_model(s)) for n, s in self.specs.items()}
        self.store.model = ModelInfo(tree=self.tree, input_size=int(self.val.image_size), dataset=self.cfg.run.dataset,
                                     specs=self.specs, params=self.params)
        if self.resume:
            self.state, self.weights, self.history = self.store.resume(self.cfg.model.kind, self.cfg.run.name)
            self._check_resumed_weights(state_arrays, build_model)
            self.registry = DeviceRegistry.from_json(self.tree.num_classes, self.state.devices, self.clock,
                                                     **self._registry_limits())
        else:
            import torch

            weights = {}
            for n, s in self.specs.items():
                torch.manual_seed(self.cfg.run.seed + max(n, 0) + 1000 * (n == FLAT))
                weights[n] = state_arrays(build_model(s))
            state = RunState(run=self.cfg.run.name, kind=self.cfg.model.kind, round=0, rounds=self.cfg.schedule.rounds,
                             mean=[float(v) for v in mean], std=[float(v) for v in std])
            self.state = self.store.create(state, weights, dump_config(self.cfg))
            self.weights = weights
            self.registry = DeviceRegistry(self.tree.num_classes, self.clock, **self._registry_limits())
        self.scheduler = Scheduler(self.tree, self.cfg.model.kind, self.cfg.schedule.mode,
                                   self.cfg.schedule.weighting, self.memory_need, self.state.credits)

    def _keep_run_architecture(self) -> None:
        """On --resume the networks are the run's: take ``[model] expert_head`` and
        ``root_stem_stride`` from its own config.toml (a stride change keeps every weight shape,
        so the weight check below could not catch it)."""
        from edgehmoe.server.config import run_architecture

        saved = self.out / "config.toml"
        if not saved.is_file():
            return
        for key, value in run_architecture(saved).items():
            if getattr(self.cfg.model, key) != value:
                logger.warning("resuming %s: the run was created with model.%s = %r (the config says %r); keeping %r",
                               self.out, key, value, getattr(self.cfg.model, key), value)
                setattr(self.cfg.model, key, value)

    def _check_resumed_weights(self, state_arrays, build_model) -> None:
        """The committed weights fit the configured networks (names, shapes, dtypes), or a
        :class:`RunDirError` naming the first difference."""
        if set(self.weights) != set(self.specs):
            raise RunDirError(f"{self.store.state_path} names weights of nodes {sorted(self.weights)} but the config "
                              f"gives nodes {sorted(self.specs)}; resume with the run's own config.toml")
        for n, spec in self.specs.items():
            ref, got = state_arrays(build_model(spec)), self.weights[n]
            diff = sorted(set(ref) ^ set(got)) or [k for k in ref if (ref[k].shape, ref[k].dtype)
                                                    != (got[k].shape, got[k].dtype)]
            if diff:
                raise RunDirError(f"{self.out / self.state.files[n]} does not fit the network of node {n} "
                                  f"(parameter {diff[0]!r}); resume with the run's own config.toml")

    def _registry_limits(self) -> dict:
        s = self.cfg.schedule
        return {"max_class_count": s.max_class_count, "max_missed": s.max_missed_rounds}

    # ------------------------------------------------------------------ transport
    def connect(self) -> None:
        """Connect to the broker (unless a transport was given) and subscribe to the devices' topics."""
        from edgehmoe.fl.mqtt import Topics

        if self.transport is None:
            b = self.cfg.broker
            self.transport = connect_mqtt(b.url, self.cfg.run.name, username=b.username, password=self.password,
                                          cafile=b.cafile, client_id=b.client_id, fresh_session=not self.resume)
        self.runner = RoundRunner(self.transport, Topics(self.cfg.run.name), self.registry, self.tree,
                                  clock=self.clock, stop=self.stop,
                                  rules=UpdateRules.from_schedule(self.cfg.schedule),
                                  offline_grace_s=self.cfg.schedule.offline_grace_s)
        self.runner.subscribe()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _pump(self, timeout: float) -> None:
        self.runner.pump(timeout)

    # ------------------------------------------------------------------ rounds
    def _lr(self, rnd: int) -> float:
        t = self.cfg.train
        if t.lr_schedule == "constant":
            return t.lr
        frac = rnd / max(1, self.cfg.schedule.rounds - 1)
        lo = t.lr * t.lr_min_factor
        return lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))

    def wait_for_devices(self) -> None:
        need = self.cfg.schedule.min_devices
        end = time.monotonic() + self.cfg.schedule.wait_for_devices_s
        while time.monotonic() < end and not self.stop.is_set():
            self._pump(0.5)
            if len(self.registry.online()) >= need:
                return
        online = len(self.registry.online())
        if online < need:
            raise RunError(
                f"only {online} of the {need} devices needed (schedule.min_devices) announced themselves within "
                f"{self.cfg.schedule.wait_for_devices_s:.0f} s; start more clients or lower min_devices"
            )

    def _await_reconnects(self) -> None:
        """Before a round is planned: let the server's own connection and the devices whose will
        arrived in the last ``schedule.offline_grace_s`` come back.

        A broker restart sends the will of every device, and each reconnects a few seconds later;
        planning at once would ask only the devices that happened to be back first. Messages that
        already arrived are handled first, so the registry is current. Waits at most the grace for
        devices and ``schedule.wait_for_devices_s`` for the server's connection.
        """
        grace = self.cfg.schedule.offline_grace_s
        self._pump(0.01)
        start = self.clock()
        told = False
        while not self.stop.is_set():
            connected = getattr(self.transport, "connected", True)
            waiting = self.registry.returning(grace) if grace > 0 else []
            waited = self.clock() - start
            if connected and (not waiting or waited >= grace):
                return
            if not connected and waited >= self.cfg.schedule.wait_for_devices_s:
                return  # tasks stay queued until the reconnect; the deadline decides, as for any round
            if not told:
                told = True
                if connected:
                    logger.info("round %d: waiting for %s to reconnect (schedule.offline_grace_s %g s)", self.round,
                                ", ".join(waiting), grace)
                else:
                    logger.info("round %d: waiting for the broker connection to come back", self.round)
            self._pump(0.2)

    def _wait_for_any_device(self) -> None:
        """Handle messages until a device is online; :class:`RunError` after ``schedule.wait_for_devices_s``."""
        end = time.monotonic() + self.cfg.schedule.wait_for_devices_s
        while not self.stop.is_set():
            self._pump(0.5)
            if self.registry.views():
                return
            if time.monotonic() > end:
                raise RunError(f"round {self.round}: no device online for {self.cfg.schedule.wait_for_devices_s:.0f} s "
                               "(schedule.wait_for_devices_s); start clients, or check the broker")

    def _task(self, rnd: int, dev_id: str, node: int, lr: float, deadline: float) -> wire.TrainTask:
        cfg = self.cfg
        # One array per node, so the tasks of a round share it (wire.iter_encode encodes it once).
        label_map = self._label_maps.get(node)
        if label_map is None:
            from edgehmoe.model.arch import expert_label_map  # a leaf head's targets are the leaves below it

            label_map = (np.arange(self.tree.num_classes, dtype=np.int64) if node == FLAT
                         else expert_label_map(self.tree, node, self.specs[node]))
            self._label_maps[node] = label_map
        return wire.TrainTask(
            run=cfg.run.name, round=rnd, task_id=f"r{rnd}-{uuid.uuid4().hex[:12]}", node=node,
            arch=dict(self.specs[node]), label_map=label_map, weights=self.weights[node],
            epochs=cfg.train.expert_epochs if node > 0 and cfg.train.expert_epochs else cfg.train.epochs,
            batch_size=cfg.train.batch_size, lr=lr, momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay, deadline_unix=deadline,
            seed=(cfg.run.seed * 100003 + rnd * 131 + zlib.crc32(dev_id.encode())) % (2**31),
            preprocess={"mean": self.mean, "std": self.std},
        )

    def run_round(self) -> dict | None:
        """Run and commit the next round; its metrics row, or ``None`` if it must be run again."""
        rnd = self.round
        cfg = self.cfg
        self._await_reconnects()
        plan = self.scheduler.plan(self.registry.views(), cfg.schedule.devices_per_round,
                                   np.random.default_rng(cfg.run.seed + rnd))
        if not plan:
            logger.warning("round %d: no online device holds data for any expert; waiting", rnd)
            self._nobody = True
            return None
        lr = self._lr(rnd)
        t_pub = self.clock()
        deadline = t_pub + cfg.schedule.round_timeout_s
        tasks = {dev: self._task(rnd, dev, node, lr, deadline) for dev, node in sorted(plan.items())}
        logger.info("round %d/%d: %s on %d device(s), lr %.4f", rnd + 1, cfg.schedule.rounds,
                    ", ".join(sorted({node_name(self.tree, n) for n in plan.values()})), len(plan), lr)
        pending = self.runner.fit_round(rnd, tasks, deadline, expiry_s=cfg.schedule.round_timeout_s)
        if pending is None:  # stopped mid-round
            return None
        return self._aggregate_and_commit(rnd, pending, lr, self.clock() - t_pub)

    def _aggregate_and_commit(self, rnd: int, pending: list[Pending], lr: float, wall_s: float) -> dict | None:
        t0 = time.perf_counter()
        rules = UpdateRules.from_schedule(self.cfg.schedule)
        runner = self.runner
        # float64, checked finite: never commits weights it cannot load; FedAvg from the running
        # sums the runner kept (the results themselves hold no weights then)
        new = aggregate(pending, rules, streams=runner.streams if runner is not None else None)
        agg_ms = (time.perf_counter() - t0) * 1000
        row = metrics_row(rnd, self.cfg.model.kind, self.tree, pending, new, lr=lr, aggregation_ms=agg_ms,
                          round_wall_s=wall_s, time_unix=self.clock(), aggregation=rules.aggregation,
                          bytes_out=runner.bytes_out if runner is not None else None,
                          bytes_in=runner.bytes_in if runner is not None else None)
        if not new:
            counts: dict[str, int] = {}
            for o in row["outcomes"].values():
                counts[o] = counts.get(o, 0) + 1
            logger.warning("round %d: no valid update (outcomes %s); round repeated", rnd,
                           row["outcomes"] if len(row["outcomes"]) <= 20 else counts)
            return None
        weights = {**self.weights, **new}
        visits = dict(self.state.visits)
        for n in new:
            visits[n] = visits.get(n, 0) + 1
        if eval_due(self.cfg.model.kind, rnd + 1, self.cfg.schedule.rounds, self.cfg.eval.every):
            # Score the weights being committed (in memory; the files are written below).
            row.update({f"val_{k}": v for k, v in self.evaluate(weights=weights).items() if k in ("info_f1", "top1")})
        state = replace(self.state, round=rnd + 1, credits=dict(self.scheduler.credits), visits=visits,
                        devices=self.registry.to_json())
        self.state = self.store.commit(rnd, new, row, state)
        self.weights = weights
        self.history.append(row)
        logger.info("round %d done: %d/%d answered, agg %.1f ms%s", rnd + 1, row["devices_answered"],
                    row["devices_asked"], agg_ms,
                    f", val info-F1 {row['val_info_f1']:.4f}" if "val_info_f1" in row else "")
        return row

    def evaluate(self, x=None, y=None, weights: Mapping[int, Weights] | None = None) -> dict:
        """Metrics of ``weights`` (default: the committed ones) on the validation split (or given data).

        The networks are built from arrays in memory, never read back from ``model.json``,
        which names the previous round's files until the round is committed.
        """
        from edgehmoe.model.arch import build_model
        from edgehmoe.model.inference import (
            FlatModel,
            HierarchicalModel,
            evaluate_models,
        )
        from edgehmoe.model.training import load_state_arrays

        x = self.val.x if x is None else x
        y = self.val.y if y is None else y
        weights = self.weights if weights is None else weights
        nets = {n: load_state_arrays(build_model(self.specs[n]), arrays).eval() for n, arrays in weights.items()}
        if self.cfg.model.kind == "flat":
            hm, fm = None, FlatModel(self.tree, nets[FLAT], self.mean, self.std)
        else:
            hm, fm = HierarchicalModel(self.tree, nets, self.mean, self.std), None
        return evaluate_models(hm, fm, x, y, which=self.cfg.model.kind)

    def run(self) -> list[dict]:
        """Prepare, connect, run the remaining rounds; returns the metric rows of all rounds."""
        self.prepare()
        self.connect()
        try:
            self.wait_for_devices()
            failures = 0
            while self.round < self.cfg.schedule.rounds and not self.stop.is_set():
                self._nobody = False
                row = self.run_round()
                if row is None and self._nobody and not self.registry.views():
                    # Nobody online (e.g. every device dropped with a broker restart and is
                    # reconnecting): wait for devices as at the start; not a failed round.
                    self._wait_for_any_device()
                    continue
                if row is None:
                    failures += 1
                    if failures > self.cfg.schedule.retries + 2:
                        raise RunError(f"round {self.round} failed {failures} times; see the log above")
                    self._pump(1.0)
                    continue
                failures = 0
                if self.progress is not None:
                    self.progress(self.round, self.cfg.schedule.rounds, row)
        finally:
            self.close()
        return self.history
