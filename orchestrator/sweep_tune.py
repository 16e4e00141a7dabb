"""The Ray Tune side of a sweep: the search space as Tune domains, the scheduler (ASHA, synchronous halving, PBT), the
stop rules, the trainable that runs one whole task sequence per trial, and trial resources."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, with_overrides
from orchestrator.sweep_config import ObjectiveSettings, ParamSpec, StopRule, SweepPlan, pbt_keys
from orchestrator.sweep_objective import OBJECTIVE_KEY, derived_metrics

def tune_param_space(plan: SweepPlan) -> dict[str, Any]:
    """The Tune search space: dotted run-config keys -> Tune domains (or grid_search lists)."""
    from ray import tune

    space: dict[str, Any] = {}
    grid = plan.config.search.algorithm == "grid"
    for dotted, spec in plan.space.items():
        if not isinstance(spec, ParamSpec):
            space[dotted] = spec
        elif spec.type == "choice":
            space[dotted] = tune.grid_search(list(spec.values)) if grid else tune.choice(list(spec.values))
        elif spec.type == "uniform":
            space[dotted] = tune.uniform(spec.lower, spec.upper)
        elif spec.type == "loguniform":
            space[dotted] = tune.loguniform(spec.lower, spec.upper)
        else:
            space[dotted] = tune.randint(int(spec.lower), int(spec.upper))
    return space


def pbt_mutations(plan: SweepPlan) -> dict[str, Any]:
    """PBT's explore step per key: a `choice` moves to a neighbouring value (or resamples), a range
    scales the value by 0.8 or 1.2 (or resamples)."""
    space = tune_param_space(plan)
    return {dotted: list(plan.space[dotted].values) if plan.space[dotted].type == "choice" else space[dotted]
            for dotted in pbt_keys(plan)}


def release_held_trial(tune_controller, trial) -> None:
    """Give a trial held at a boundary (RUNNING, waiting inside `tune.report`) its next step.
    Schedulers get the controller wrapped (TrialRunnerWrapper), without a way to resume a trial,
    so this calls the pinned Ray 2.60's private `_schedule_trial_train` of the controller itself."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller._schedule_trial_train(trial)


def synchronous_pbt(**pbt_args):
    """Ray's synchronous PopulationBasedTraining with two changes: a trial that reaches a task
    boundary waits there in its own process, and the barrier waits only for trials that can still
    reach it.

    Ray 2.60 (ray/tune/schedulers/pbt.py, synch) perturbs the population in `on_trial_result` of
    the last trial to reach the boundary, once no trial of `tune_controller.get_live_trials()` has a
    `last_train_time` below `_next_perturbation_sync`, and pauses every trial there, the last one
    too. Tune keeps a paused trial's process only when another trial is staged to take it over
    (`TuneController._maybe_cache_trial_actor`), so at every boundary about half the population
    started a fresh process (measured: about 15 s late on 2 cores, its imports under load).

    - **Held, not paused.** A trial that must wait gets NOOP: Tune leaves it RUNNING with no
      training step scheduled, so it waits inside `tune.report` (the trial reports each task with
      its checkpoint). Once the population is perturbed, every held trial that was not exploited
      gets its next step (`TuneController._schedule_trial_train`, private, of the pinned Ray 2.60),
      after the save PBT asked of the donors. Only an exploited trial is paused: it restarts from
      its donor's checkpoint.
    - **Survivors.** An errored trial stays in the live set (`TuneController._process_trial_failure`
      marks it ERROR; only `stop_trial` discards from `_live_trials`) at the task it last reported,
      so the others would wait for it forever. A trial a stop rule ends before the boundary leaves
      the set, but when it was the last one awaited, nobody arrives after it to perturb. So once
      every trial that has not ended waits at the boundary, `choose_trial_to_run` (which Tune calls
      every step) perturbs them as Ray's synch branch would. An ended trial is never a donor:
      `_quantiles` ranks only trials that are not finished."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining

    class SynchronousPBT(PopulationBasedTraining):
        def on_trial_result(self, tune_controller, trial, result):
            boundary = self._next_perturbation_sync
            held = self._held(tune_controller)  # before this result moves the boundary
            decision = super().on_trial_result(tune_controller, trial, result)
            if self._next_perturbation_sync != boundary:  # this result completed the boundary
                self._release(tune_controller, held)
                return self.NOOP if trial.status == Trial.PAUSED else self.CONTINUE  # (PAUSED: exploited)
            if decision == self.PAUSE:  # the rest of the population has not arrived: hold it
                return self.NOOP
            return decision  # between boundaries

        def choose_trial_to_run(self, tune_controller):
            survivors = [trial for trial in tune_controller.get_trials() if not trial.is_finished()]
            if survivors and all(trial.status in (Trial.PAUSED, Trial.RUNNING) and self._arrived(trial)
                                 for trial in survivors):
                held = self._held(tune_controller)
                self._perturb(tune_controller, survivors)
                self._release(tune_controller, held)
            # Tune stages one trial per call. Ray's pick is the lowest `last_train_time` among
            # PENDING and PAUSED trials, so it names the trial staged last time (PENDING until its
            # actor runs) again and again, and the population resumed one trial after another.
            # Pick a paused trial not yet staged first.
            paused = [trial for trial in tune_controller.get_trials()
                      if trial.status == Trial.PAUSED and not self._arrived(trial)]
            if paused:
                return min(paused, key=lambda trial: self._trial_state[trial].last_train_time)
            return super().choose_trial_to_run(tune_controller)

        def _arrived(self, trial) -> bool:
            # PBT sets `last_train_time` only at a boundary's result, and perturbing the population
            # moves `_next_perturbation_sync` past every trial.
            return self._trial_state[trial].last_train_time >= self._next_perturbation_sync

        def _held(self, tune_controller) -> list:
            """The trials waiting at the boundary in their process: RUNNING, with no step scheduled
            since they arrived. A trial that errors or ends meanwhile is no longer RUNNING."""
            return [trial for trial in tune_controller.get_trials()
                    if trial.status == Trial.RUNNING and self._arrived(trial)]

        def _perturb(self, tune_controller, survivors: list) -> None:
            lower, upper = self._quantiles()
            boundary = max(self._trial_state[trial].last_train_time for trial in survivors)
            middle = [trial for trial in survivors if trial not in lower and trial not in upper]
            for trial in upper + middle + lower:  # donors' checkpoints first, as Ray orders them
                self._trial_state[trial].last_perturbation_time = boundary
                self._checkpoint_or_exploit(trial, tune_controller, upper, lower)
            self._next_perturbation_sync = max(self._next_perturbation_sync + self._perturbation_interval, boundary)

        def _release(self, tune_controller, held: list) -> None:
            for trial in held:
                if trial.status == Trial.RUNNING:  # an exploited one is PAUSED
                    release_held_trial(tune_controller, trial)

    return SynchronousPBT(synch=True, **pbt_args)


def halving_rungs(grace_period: int, reduction_factor: float, num_tasks: int) -> list[int]:
    """The task boundaries where successive halving cuts: grace_period * reduction_factor**k
    (rounded up to whole tasks), before the last task (after it there is nothing left to save)."""
    rungs, k = [], 0
    while (rung := math.ceil(grace_period * reduction_factor ** k - 1e-9)) < num_tasks:
        if rung not in rungs:
            rungs.append(rung)
        k += 1
    return rungs


def synchronous_halving(*, metric: str, time_attr: str, num_tasks: int, grace_period: int, reduction_factor: float):
    """Successive halving with a barrier at each rung: a trial that reaches a rung waits there in
    its own process (held, as synchronous PBT holds it) until every trial that can still reach the
    rung has, then only the top floor(n / reduction_factor) (at least one, and every trial tied
    with the last one kept) go on and the rest are stopped.

    Why not Ray's ASHA: it is asynchronous, so a trial that reaches a rung with no peers there yet
    always goes on. With the few trials a continual-learning sweep affords, all running at once,
    the first arrivals are a large part of the population: measured on the mini-mtil bench (4
    trials, 3 tasks), ASHA trained 0.83 of the grid's trial-tasks; a synchronous cut at the same
    rung (after task 2, keep 1) trains (4 * 2 + 1) / 12 = 0.75."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    rungs = halving_rungs(grace_period, reduction_factor, num_tasks)

    class SynchronousHalving(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.scores: dict[int, dict[str, float]] = {rung: {} for rung in rungs}
            self.decided: set[int] = set()

        def on_trial_result(self, tune_controller, trial, result):
            rung = int(result.get(time_attr, 0))
            if rung not in self.scores or rung in self.decided or result.get("done"):
                return self.CONTINUE
            self.scores[rung][trial.trial_id] = float(result[metric])
            kept = self._cut(tune_controller, rung, reporting=trial)
            if kept is None:
                return self.NOOP  # held: the rest of the trials have not reached the rung
            return self.CONTINUE if trial.trial_id in kept else self.STOP

        def choose_trial_to_run(self, tune_controller):
            # A trial that ends before a rung (a stop rule, an error) may be the one the others
            # wait for, and no result will arrive after it to cut them.
            for rung in rungs:
                if rung not in self.decided and self.scores[rung]:
                    self._cut(tune_controller, rung, reporting=None)
            return super().choose_trial_to_run(tune_controller)

        def _cut(self, tune_controller, rung: int, reporting) -> set[str] | None:
            """Once no trial that has not ended is short of `rung`, keep the best and stop the rest
            (the held ones here; `reporting`, the trial whose result completed the rung, by the
            caller's decision). Returns the kept trial ids, or None while trials are awaited."""
            alive = [t for t in tune_controller.get_trials() if not t.is_finished()]
            if any(int((t.last_result or {}).get(time_attr, 0)) < rung and t is not reporting for t in alive):
                return None
            self.decided.add(rung)
            alive_ids = {t.trial_id for t in alive}
            ranked = sorted(((score, trial_id) for trial_id, score in self.scores[rung].items()
                             if trial_id in alive_ids), reverse=True)
            if not ranked:
                return set()
            keep = max(1, math.floor(len(ranked) / reduction_factor + 1e-9))
            cutoff = ranked[keep - 1][0]
            kept = {trial_id for score, trial_id in ranked if score >= cutoff}
            for t in alive:
                if t is reporting or t.status != Trial.RUNNING or t.trial_id not in self.scores[rung]:
                    continue
                if int((t.last_result or {}).get(time_attr, 0)) != rung:
                    continue  # went past the rung already (restored by --resume): not held here
                if t.trial_id in kept:
                    release_held_trial(tune_controller, t)
                else:
                    tune_controller.stop_trial(t)
            return kept

    return SynchronousHalving()


def tune_config(plan: SweepPlan, num_tasks: int, max_concurrent: int):
    from ray import tune

    settings = plan.config
    scheduler = None
    if settings.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="task", max_t=num_tasks,
                                  grace_period=min(settings.scheduler.grace_period, num_tasks),
                                  reduction_factor=settings.scheduler.reduction_factor)
    elif settings.scheduler.type == "halving":
        scheduler = synchronous_halving(metric=OBJECTIVE_KEY, time_attr="task", num_tasks=num_tasks,
                                        grace_period=settings.scheduler.grace_period,
                                        reduction_factor=settings.scheduler.reduction_factor)
    elif settings.scheduler.type == "pbt":
        # Synchronous: trials are compared after the same number of tasks (an objective after task 3
        # is not comparable with one after task 2: more tasks, more to forget). A trial that reaches
        # a boundary first waits in its process for the rest of the population.
        scheduler = synchronous_pbt(
            time_attr="task", perturbation_interval=settings.scheduler.perturbation_interval,
            hyperparam_mutations=pbt_mutations(plan), quantile_fraction=settings.scheduler.quantile_fraction,
            resample_probability=settings.scheduler.resample_probability)
    search_alg = None
    if settings.search.algorithm in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a BasicVariantGenerator it did not build itself.
        search_alg = BasicVariantGenerator(random_state=settings.search.seed, max_concurrent=max_concurrent)
    elif settings.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=settings.search.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(random_state_seed=settings.search.seed)
    limit_by_tune = settings.search.algorithm not in ("random", "grid")
    return tune.TuneConfig(metric=OBJECTIVE_KEY, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=settings.search.num_samples,
                           max_concurrent_trials=max_concurrent if limit_by_tune else None,
                           reuse_actors=True)


def stop_rule_stopper(rules: list[StopRule]):
    from ray import tune

    class StopRuleStopper(tune.Stopper):
        """Ends a trial when any stop rule is violated; the others keep running."""

        def __init__(self, stop_rules: list[StopRule]):
            self.stop_rules = stop_rules

        def __call__(self, trial_id: str, result: dict) -> bool:
            return any(rule.violated(result) for rule in self.stop_rules)

        def stop_all(self) -> bool:
            return False

    return StopRuleStopper(rules)


def tune_result(metrics: dict, objective: ObjectiveSettings, num_tasks: int) -> dict:
    """A task's report as Tune takes it: the metrics, the sweep's objective, and `done` after the
    last task (Tune consults no scheduler on a result marked done: PBT would pause and perturb a
    trial with nothing left to train)."""
    result = dict(metrics)
    result.update(derived_metrics(result, objective))
    result["done"] = result.get("task", 0) >= num_tasks
    return result


class TuneTaskReport:
    """The reporting point of a trial that trains in its own process (`trainer.report_task` calls
    it after each task): the task's metrics with the objective and its checkpoint go to Tune, as
    `tune.report`, which copies the checkpoint to the trial's storage and returns once Tune
    continues the trial (when Tune stops or pauses it instead, it ends the trial there).

    The last task's report waits for the run to end (`final`, which `run_trial` reports after
    `run_sequence` returns): Tune ends a trial at its result marked done, and the run would lose
    what it does at its end (the final matrix, the log, its FINISHED status)."""

    def __init__(self, objective: ObjectiveSettings, num_tasks: int):
        self.objective, self.num_tasks = objective, num_tasks
        self.final: tuple[dict, str] | None = None

    def __call__(self, metrics: dict, directory: str | None) -> None:
        from ray import tune

        result = tune_result(metrics, self.objective, self.num_tasks)
        if result["done"]:
            self.final = (result, directory)
            return
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    def report_final(self) -> None:
        from ray import tune

        if self.final is not None:
            result, directory = self.final
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)


def objective_report_callback(objective: ObjectiveSettings, num_tasks: int, reports):
    """For a trial on Ray Train workers: a Train callback that hands each per-task report, with the
    objective added, and its task checkpoint to the trial (through the `reports` queue), which
    reports both to Tune.

    Run by Ray Train's controller after every `ray.train.report`. Ray's own TuneReportCallback
    forwards only the metrics (the checkpoint's path as one of them), so Tune would hold no
    checkpoint of the trial, and PBT could copy nothing at a task boundary."""
    from ray.train.v2.api.callback import UserCallback

    class ObjectiveReportCallback(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            result = tune_result(metrics[0], objective, num_tasks)
            reports.put((result, checkpoint.path if checkpoint else None))  # blocks until the trial took the last

    return ObjectiveReportCallback()


def orphaned_reservation_releaser():
    """A Tune callback that frees the training workers' reservations of trials Tune has ended
    (see `orchestrator.runtime.release_orphaned_placement_groups`), checked about once a second
    and before a trial starts, so a stopped, paused or exploiting trial's cores go to the next one."""
    import time

    from ray import tune

    from orchestrator.runtime import release_orphaned_placement_groups

    class OrphanedReservationReleaser(tune.Callback):
        def __init__(self):
            self.checked_at = 0.0

        def _release(self) -> None:
            self.checked_at = time.monotonic()
            release_orphaned_placement_groups()

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.checked_at > 1.0:
                self._release()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._release()

    return OrphanedReservationReleaser()


def run_trial(trial_params: dict, *, base: dict, objective: dict, num_tasks: int, sweep_id: str,
              parent_run_id: str, shared=None) -> None:
    """The Tune function trainable: one whole task sequence with this trial's hyperparameters. It
    trains in this process (`train.launch: in_process`, which the sweep sets for one-worker
    trials) or on Ray Train workers that this process drives."""
    from ray import tune

    from orchestrator.run import run_sequence
    from orchestrator.trainer import checkpoint_folder

    context = tune.get_context()
    trial_id = context.get_trial_id()
    config = with_overrides(RunConfig(**base), dict(trial_params))
    tags = {"vlcl.sweep_id": sweep_id, "vlcl.trial_id": trial_id}
    checkpoint = tune.get_checkpoint()
    # Open for the whole sequence: an in-process retry after a failure reads resume_from again.
    with checkpoint_folder(checkpoint) as resume_from:
        own = False
        if checkpoint is not None:
            # Tune restarts a trial from a task checkpoint: its own (`--resume`: it continues its MLflow
            # run) or a stronger trial's (an exploit: a new run, tagged with where its state came from).
            source_folder = Path(checkpoint.path).parent.name
            own = source_folder == Path(context.get_trial_dir()).name
            if not own:
                donor = re.search(r"[0-9a-f]{5}_\d{5}", source_folder)
                tasks_done = json.loads((Path(resume_from) / "progress.json").read_text())["tasks_done"]
                tags |= {"vlcl.exploited_from": donor.group(0) if donor else source_folder,
                         "vlcl.exploited_after_task": str(tasks_done)}
        settings = ObjectiveSettings(**objective)
        sequence_args = dict(resume=own, resume_finished=own, resume_from=resume_from, parent_run_id=parent_run_id,
                             run_name_suffix=f"-{trial_id}", extra_tags=tags, shared=shared)
        if config.train.launch == "in_process":
            # tune.report returns only once Tune continues the trial: a trial it stops or pauses at that
            # result trains no task it would throw away.
            report = TuneTaskReport(settings, num_tasks)
            run_sequence(config, task_report=report, quiet=True, **sequence_args)
            report.report_final()
            return
        run_on_ray_train(config, objective=settings, num_tasks=num_tasks, **sequence_args)


def run_on_ray_train(config: RunConfig, *, objective: ObjectiveSettings, num_tasks: int, **sequence_args) -> None:
    """A trial on Ray Train workers. The sequence runs in a thread, whose Train controller hands
    each task's report to this thread (Tune's), which reports it to Tune. Training holds after
    each task until Tune continues the trial (tune.report returns only then): a trial Tune stops or
    pauses at that result does not train a task it would throw away."""
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from orchestrator.run import run_sequence

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    gate = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_sequence(config, tune_gate=gate, ray_callbacks=[objective_report_callback(objective, num_tasks, reports)],
                         quiet=True, **sequence_args)
        except BaseException as err:  # re-raised in Tune's thread below
            failure.append(err)
        finally:
            reports.put(None)

    sequence = threading.Thread(target=run, name="vlcl-trial-sequence", daemon=True)
    sequence.start()
    while (item := reports.get()) is not None:
        metrics, checkpoint_path = item
        tune.report(metrics, checkpoint=tune.Checkpoint(checkpoint_path) if checkpoint_path else None)
        gate.put(True)
    sequence.join()
    if failure:
        raise failure[0]


def trial_resources(plan: SweepPlan, cluster_has_gpus: bool) -> dict[str, float]:
    """What one trial holds at once: its own process plus its training workers (a one-worker trial
    that trains in its own process holds both in one reservation: `trial_reservation`)."""
    train = plan.base.train
    use_gpu = cluster_has_gpus if train.use_gpu == "auto" else bool(train.use_gpu)
    return {"CPU": plan.config.resources.trial_cpus + train.num_workers * train.cpus_per_worker,
            "GPU": float(train.num_workers) if use_gpu else 0.0}


def trial_reservation(per_trial: dict[str, float], launch: str, trial_cpus: float) -> dict[str, float]:
    """What the trial's process reserves: all of `per_trial` when it trains in it (`in_process`);
    else its own CPUs, while Ray Train reserves the workers'."""
    if launch == "in_process":
        return {kind: amount for kind, amount in per_trial.items() if amount > 0}
    return trial_process_resources(trial_cpus)


def trial_process_resources(trial_cpus: float) -> dict[str, float]:
    """What the trial's own process reserves. Tune refuses an all-zero reservation, so a trial that
    holds no CPU reserves one byte of memory instead: on a 2-core machine Ray Data needs both cores
    (a read task and a decoding actor) before the trial's training workers start."""
    return {"CPU": trial_cpus} if trial_cpus > 0 else {"memory": 1.0}


def derive_max_concurrent_trials(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster holds side by side (at least one: an autoscaler adds nodes)."""
    fits = [cluster.get(kind, 0.0) / need for kind, need in per_trial.items() if need > 0]
    return max(1, int(math.floor(min(fits) + 1e-9))) if fits else 1


def tune_trial_states(results) -> dict[str, tuple[str, str]]:
    """Trial folder -> (trial id, Tune's state: TERMINATED, ERROR, PENDING, PAUSED, RUNNING)."""
    analysis = getattr(results, "_experiment_analysis", None)
    return {Path(trial.path).name: (trial.trial_id, trial.status)
            for trial in getattr(analysis, "trials", None) or []}
