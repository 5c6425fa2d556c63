"""`train.py compare`: trains one config once per point of a sweep (by default, per norm) and per seed,
then says which differences are real.

    python train.py compare --config configs/unet.yaml --norms batch,group,instance,none --seeds 3 --out DIR
    python train.py compare --config configs/unet.yaml --sweep model.net.norm=batch,group \
        --sweep data.batch_size=1,2,8 --seeds 0,1,2 --jobs 2 --out DIR --trainer.max_steps 200

Each run is its own `train.py fit` process (one run's failure, memory or wandb state cannot touch the
others) in `DIR/runs/<name>/`: checkpoints, CSV and TensorBoard logs, `command.txt`, `run.log`,
`summary.json`. Runs with the same seed share data order and initialisation; the split is the same for
all. Runs execute `--jobs` at a time on this machine, as Ray tasks on a cluster (`--launcher ray`), or as
SLURM jobs through submitit (`--launcher slurm`).

Re-running the same command into the same DIR keeps finished runs untouched, resumes interrupted ones
from their `last.ckpt` and re-runs failed ones; a run whose process dies is retried from its last
checkpoint up to `--max-retries` times. DIR/compare.json records the configs and overrides: another set
in the same DIR is refused (`--fresh` starts over).

The report: `DIR/report.html` (interactive dashboard, rewritten after every finished run),
`DIR/report.md` (static plots), `DIR/results.json`. Per sweep point and metric: n, mean, standard
deviation and 95 % confidence interval over seeds (final value, and best value of the monitored metric
and its step); per point, the seed-by-seed difference to the baseline with its CI and a paired t-test.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import difflib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest.mock
import warnings
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from zoo.callbacks import SUMMARY_FILE
from zoo.files import atomic_write_text

STATE_FILE = "compare.json"
RAY_NODES = "ray_nodes.txt"  # in a run dir: the Ray node (IP/node id) of each attempt, one per line
JOB_RESULT = "job_result.json"  # in a run dir: what a submitit job's `execute` returned (see launch_slurm)
RUN_LOCK = ".lock"  # in a run dir: held by the process writing the run (see _hold_run)
RAY_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's multi-machine switch (see launch_ray)


@dataclass
class Run:
    name: str
    values: dict[str, str]  # the sweep point: {key: value}
    dir: Path
    summary: dict = field(default_factory=dict)
    seed: int | None = None  # None: the config's own seed
    point: str = ""  # the sweep point's name (without the seed)
    status: str = "pending"  # pending, running, ok, failed
    retries: int = 0

    @property
    def node(self) -> str | None:
        """IP/node id of the Ray node the run's last attempt ran on (None: not run by the Ray launcher)."""
        nodes = ray_nodes(self.dir)
        return nodes[-1] if nodes else None

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok"


# ------------------------------------------------------------------------------------------------
# the plan

def parse_sweeps(norms: str | None, sweeps: list[str], norm_key: str = "model.net.norm") -> dict[str, list[str]]:
    """`--norms a,b` (sweeps `norm_key`) and `--sweep KEY=v1,v2` (repeatable) -> {key: [values]}, in order."""
    out: dict[str, list[str]] = {}
    specs = ([f"{norm_key}={norms}"] if norms else []) + list(sweeps)
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise ValueError(f"bad sweep {spec!r}; expected KEY=v1,v2 (e.g. model.net.norm=batch,group)")
        if key in out:
            raise ValueError(f"{key!r} is swept twice (by --norms and --sweep, or two --sweep)")
        repeated = [v for i, v in enumerate(vals) if v in vals[:i]]
        if repeated:  # its runs would be the same runs twice
            raise ValueError(f"{key}={values.strip()} repeats {repeated[0]!r}; give each value once")
        out[key] = vals
    if not out:
        raise ValueError("nothing to compare; give --norms a,b,... or --sweep KEY=v1,v2, or set compare.sweep "
                         "in the config")
    return out


def parse_metrics(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """`--metric val/L_R:min` (repeatable) -> (("val/L_R", "min"), ...): which way is better is stated,
    not guessed from the name."""
    out = []
    for spec in specs:
        name, _, mode = spec.rpartition(":")
        if not name or mode not in ("min", "max"):
            raise ValueError(f"--metric {spec!r}: expected NAME:min or NAME:max (which way is better), "
                             "e.g. val/L_R:min")
        out.append((name, mode))
    return tuple(out)


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 3` (seeds 0, 1, 2) or `--seeds 0,4,7`; None (not given): the config's own seed."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"--seeds {text!r} is not a count (3 means seeds 0, 1, 2) or a comma-separated list of "
                         "non-negative integers (0,1,2)")
    seeds = [int(p) for p in parts]
    if len(seeds) == 1:
        if seeds[0] == 0:
            raise ValueError("--seeds 0: the number of seeds must be at least 1")
        return list(range(seeds[0]))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed")
    return seeds


def parse_baseline(text: str | None, sweeps: dict[str, list[str]]) -> dict[str, str]:
    """`--baseline model.net.norm=layer` -> {key: value}; default: the first value of the first swept key.
    A point's baseline is the point with the same values but these."""
    if text is None:
        key = next(iter(sweeps))
        return {key: sweeps[key][0]}
    base = {}
    for spec in text.split(";"):
        key, sep, value = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or key not in sweeps or value.strip() not in sweeps[key]:
            swept = "; ".join(f"{k}={','.join(v)}" for k, v in sweeps.items())
            raise ValueError(f"--baseline {text!r} must be KEY=VALUE with a swept key and one of its values ({swept})")
        base[key] = value.strip()
    return base


def point_name(values: dict[str, str]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def plan_runs(sweeps: dict[str, list[str]], out: Path, seeds: list[int] | None = None,
              config_seed: int | None = None) -> list[Run]:
    """One run per sweep point and seed (the point's name, plus `,seed=S` when seeds are given). A run
    of an earlier comparison into `out` made without seeds ran with the config's seed (`config_seed`):
    it is that seed's run, kept in its folder, so that adding `--seeds` extends the comparison."""
    runs = []
    for combo in itertools.product(*sweeps.values()):
        values = dict(zip(sweeps, combo))
        point = point_name(values)
        for seed in seeds or [None]:
            name = point if seed is None else f"{point},seed={seed}"
            folder = out / "runs" / run_folder(name)
            unseeded = out / "runs" / run_folder(point)
            if seed is not None and seed == config_seed and unseeded.exists() and not folder.exists():
                folder = unseeded
            runs.append(Run(name, values, folder, seed=seed, point=point))
    return runs


def run_folder(name: str) -> str:
    return re.sub(r"[^\w.,=+-]", "_", name)


# ------------------------------------------------------------------------------------------------
# checks before the first run

def check_arguments(configs: list[str], overrides: list[str], norms: str | None,
                    sweep_specs: list[str]) -> tuple[dict[str, list[str]], str, str, int | None]:
    """Parses the configs and overrides once, as every run will, without building anything: an option
    no run accepts or a sweep key that names no argument fails here, before any run starts. Without
    `--norms` / `--sweep`, the sweep is the config's own `compare.sweep`. Returns the sweeps, the
    monitored metric and its mode (`ZooModule.monitor` of the configured task), and the configured seed
    (None: not a number, e.g. `true`, a random one)."""
    from jsonargparse import Namespace

    from zoo.cli import ZooCLI, class_at, error_line

    class ParseOnly(ZooCLI):
        def _parse_ckpt_path(self):
            pass

        def _set_seed(self):
            pass

        def instantiate_classes(self):
            pass

        def _run_subcommand(self, subcommand):
            pass

    args = ["fit"] + [a for c in configs for a in ("--config", c)] + overrides
    with warnings.catch_warnings():  # LightningCLI warns when given args while sys.argv holds compare's own
        warnings.simplefilter("ignore")
        cli = ParseOnly(args=args)
    cfg = cli.config["fit"]
    # the network config's norm (zoo.models.config), or the task's own for tasks without one
    norm_key = "model.net.norm" if cfg.get("model.init_args.net.norm") is not None else "model.norm"
    sweeps = parse_sweeps(norms, sweep_specs if norms or sweep_specs else cfg["compare"]["sweep"], norm_key)
    keys, dicts = set(), set()  # dicts: arguments holding a dict, whose entries are set one by one too
    for key, value in cfg.items(branches=True) if hasattr(cfg, "items") else []:
        keys.add(key.replace(".init_args.", "."))
        if isinstance(value, Namespace) and "class_path" in value:
            keys.add(key)
        if isinstance(value, dict):
            dicts.add(key.replace(".init_args.", "."))
    unknown = [k for k in sweeps if k not in keys and k.rpartition(".")[0] not in dicts]
    if unknown:
        k = unknown[0]
        # keys ending like it first (model.norm -> model.net.norm), then keys spelled like it
        tail = k.rsplit(".", 1)[-1]
        close = [key for key in sorted(keys) if difflib.get_close_matches(tail, [key.rsplit(".", 1)[-1]], cutoff=0.75)]
        close = list(dict.fromkeys(close + difflib.get_close_matches(k, sorted(keys), n=3, cutoff=0.5)))[:3]
        raise ValueError(f"--sweep {k}: no such argument" + (f"; closest: {', '.join(close)}" if close else "")
                         + " (`train.py fit --config ... --print_config` lists every argument)")
    for key, values in sweeps.items():  # each value as its run will parse it: a wrong type fails here
        for value in values:
            try:
                cli.parser.parse_args([*args, f"--{key}={value}"])
            except Exception as e:  # noqa: BLE001  (jsonargparse's errors have no common type)
                raise ValueError(f"--sweep {key}: value {value!r} is refused: {error_line(e).removeprefix('error: ')}") \
                    from None
    init = cfg["model"].get("init_args") or {}
    if "model_name" in init:  # a timm name (`zoo.models.create_model`): a typo fails here, not in every run
        from zoo.models import check_model_name

        for name in sweeps.get("model.model_name", [init["model_name"]]):
            check_model_name(name)
    task = class_at(cfg["model"]["class_path"])
    seed = cfg["seed_everything"]
    return (sweeps, *getattr(task, "monitor", ("val/loss", "min")), seed if type(seed) is int else None)


def normalize_overrides(overrides: list[str]) -> list[str]:
    """`--key value` -> `--key=value` (a `--` token without `=` and a next token not starting with `-`),
    as the CLI reads both: the same override, however it is spelled."""
    out, i = [], 0
    while i < len(overrides):
        token = overrides[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(overrides) \
                and not overrides[i + 1].startswith("-"):
            out.append(f"{token}={overrides[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def same_overrides(a: list[str], b: list[str]) -> bool:
    """Equal normalized overrides, or the same `--key=value`s in another order where order cannot
    matter: each key once, and none a config file or an append (`+=`), where the later one wins."""
    keys = [t.split("=", 1)[0] for t in a]
    order_free = len(set(keys)) == len(keys) and "--config" not in keys and all(
        t.startswith("--") and "=" in t and not k.endswith("+") for t, k in zip(a, keys))
    return a == b or (order_free and sorted(a) == sorted(b))


def prepare_out(out: Path, configs: list[str], overrides: list[str], fresh: bool, runs: list[Run] = ()) -> str:
    """Refuses a DIR that holds a comparison of other configs or overrides (results of different
    settings must not mix), or runs that the planned `runs` leave out (they would drop out of its
    report; a plan adding sweep values or seeds is fine); `fresh` deletes the previous comparison
    first. Overrides are compared normalized (`normalize_overrides`), also those of a compare.json
    written before they were, and in any order where it cannot matter (`same_overrides`). Returns the
    comparison's wandb group: made when it starts and kept by every re-run into DIR."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    overrides = normalize_overrides(overrides)
    state = {"configs": [{"path": str(Path(c).resolve()), "sha256": hashlib.sha256(Path(c).read_bytes()).hexdigest()}
                         for c in configs], "overrides": overrides,
             "group": f"{Path(configs[-1]).stem}-{time.strftime('%Y%m%d-%H%M%S')}", "runs": [r.dir.name for r in runs]}
    path = out / STATE_FILE
    if fresh:
        for name in ("runs", "plots", "samples"):
            shutil.rmtree(out / name, ignore_errors=True)
    elif path.exists():
        before = json.loads(path.read_text())
        differ = []
        if [c["path"] for c in before["configs"]] != [c["path"] for c in state["configs"]]:
            differ.append(f"configs: before {[c['path'] for c in before['configs']]}, now {[c['path'] for c in state['configs']]}")
        elif before["configs"] != state["configs"]:
            differ.append("the config files' contents changed")
        was = normalize_overrides(before["overrides"])
        if not same_overrides(was, overrides):
            differ.append(f"overrides: before {was}, now {overrides}")
        if differ:
            raise ValueError(f"--out {out} holds a comparison with other settings ({'; '.join(differ)}); "
                             "use another --out, or --fresh to delete it and start over")
        planned = {r.dir.name for r in runs}
        left_out = [f for f in map(run_folder, before.get("runs", [])) if f not in planned and (out / "runs" / f).exists()]
        if left_out:
            raise ValueError(f"--out {out} holds runs this sweep leaves out ({', '.join(left_out)}), which would "
                             "drop out of its report; give a sweep and seeds that include them (adding values or "
                             "seeds is fine; runs made without --seeds are the config's seed's), another --out, or "
                             "--fresh to delete them and start over")
        state["group"] = before.get("group", state["group"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2))
    return state["group"]


# ------------------------------------------------------------------------------------------------
# running one run (locally, or inside a Ray task: plain data in, plain data out)

def run_spec(run: Run, configs: list[str], overrides: list[str], group: str, env: dict[str, str],
             sweeps: dict[str, list[str]], imports: list[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "zoo.cli", "fit", *(f"--import={m}" for m in imports)]
    for c in configs:
        cmd += ["--config", str(Path(c).resolve())]
    cmd += overrides
    for key, value in run.values.items():
        cmd += [f"--{key}", value]
    if run.seed is not None:
        cmd.append(f"--seed_everything={run.seed}")
    tags = ["compare"] + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in run.values.items()]
    tags += [f"seed={run.seed}"] if run.seed is not None else []
    cmd += [f"--trainer.default_root_dir={run.dir.resolve()}", f"--wandb.group={group}",
            f"--wandb.name={group}/{run.name}", "--wandb.tags=" + json.dumps(tags), "--wandb.job_type=compare",
            # the sweep run, not the config's default, in the run's config (and wandb's)
            "--compare.sweep=" + json.dumps([f"{k}={','.join(v)}" for k, v in sweeps.items()])]
    return {"cmd": cmd, "dir": str(run.dir.resolve()), "env": env, "cwd": os.getcwd()}


# Set when the user interrupts a local compare (Ctrl-C): no run is started or retried after it, and
# the runs going on are told to stop (launch_local).
_STOPPING = threading.Event()
_CHILDREN: set[subprocess.Popen] = set()


def execute(spec: dict, max_retries: int) -> dict:
    """Runs `spec`'s fit until it finishes, fails, or dies more than `max_retries` times (killed, out
    of memory, node lost: no summary and no `error:` line); every attempt after the first resumes from
    the run's last.ckpt. A run that wrote an ok summary is done, however its process ended after that.
    Returns {"summary", "retries", "returncode"}."""
    run_dir = Path(spec["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec["env"]}
    summary_path = run_dir / SUMMARY_FILE
    retries = 0
    while True:
        with open(run_dir / "run.log", "a") as log, _hold_run(run_dir, log) as lock:
            finished = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            if finished.get("status") == "ok":  # by another compare into this --out, while this one waited
                log.write("=== finished by another process meanwhile: kept\n")
                return {"summary": finished, "retries": retries, "returncode": 0}
            if _STOPPING.is_set():
                return {"summary": {"status": "failed", "error": "interrupted"}, "retries": retries, "returncode": None}
            cmd = list(spec["cmd"])
            if (run_dir / "checkpoints" / "last.ckpt").exists():
                cmd.append("--ckpt_path=last")
            (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")  # pasted into a shell, it runs
            (run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # a stale summary must not speak for this attempt
            log.write(f"=== attempt {retries + 1}: {shlex.join(cmd)}\n")
            log.flush()
            with subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                  cwd=spec["cwd"], preexec_fn=_die_with_parent, pass_fds=(lock,)) as proc:
                _CHILDREN.add(proc)
                try:
                    while proc.poll() is None:  # polled: Ray's cancel interrupts Python code, not a blocking wait
                        time.sleep(0.2)
                except KeyboardInterrupt:  # a Ray task cancelled, a submitit job cancelled: stop the run
                    proc.send_signal(signal.SIGINT)  # at its step's end
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()  # resumable all the same
                    raise
                finally:
                    _CHILDREN.discard(proc)
            # read while the run is still locked: another compare waiting on it starts by unlinking it
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if summary.get("status") == "ok":
            return {"summary": summary, "retries": retries, "returncode": proc.returncode}
        reason = failure_reason(run_dir / "run.log", proc.returncode)
        died = proc.returncode != 0 and not summary and not reason.startswith("error:")
        if died and retries < max_retries and not _STOPPING.is_set():
            retries += 1
            continue
        if proc.returncode != 0 and summary.get("status") != "failed":
            summary = {**summary, "status": "failed",
                       "error": reason.removeprefix("error: ") if not died else f"{reason} (after {retries} retries)"}
        return {"summary": summary, "retries": retries, "returncode": proc.returncode}


@contextlib.contextmanager
def _hold_run(run_dir: Path, log):
    """An exclusive lock on the run's folder (flock on its RUN_LOCK file; yields the descriptor). The
    run's training process inherits the descriptor, so the lock is held while that process lives, even
    past the death of the launcher that started it: when Ray declares a worker or node lost whose
    process still runs, or two `compare`s share an --out, the other waits instead of writing the same
    run at once. (On a shared filesystem this needs working locks, as NFSv4 has; without, it goes on.)"""
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.write("=== waiting for another process of this run to end\n")
            log.flush()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (some NFS mounts): the run goes on unguarded
            log.write(f"=== the run folder cannot be locked ({e}); going on without\n")
        yield fd
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    """In the run's process: ask Linux to kill it when the thread that started it dies, so a killed
    compare leaves no orphan still writing into a run that the next compare resumes; and let it stop
    on SIGINT (`execute` sends it one to stop it) even where its launcher's worker ignores or blocks it."""
    # ignored or blocked in the launcher's worker (a Ray worker blocks it), it would stay so in the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def failure_reason(log: Path, returncode: int) -> str:
    """The last attempt's own `error: ...` line (the CLI ends every failure with one), else how it ended."""
    text = log.read_text(errors="replace").rsplit("=== attempt ", 1)[-1]
    lines = text.strip().splitlines()[1:]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}: {lines[-1] if lines else '(no output)'}"


# ------------------------------------------------------------------------------------------------
# launchers: both call `on_done(run, result)` from the main thread as runs finish

# The launchers that read each option: given to another, it would be silently ignored.
LAUNCHER_OPTIONS = {"jobs": ("local",), "devices_per_run": ("local", "ray"), "ray_address": ("ray",),
                    "cpus_per_run": ("ray", "slurm"), "slurm": ("slurm",)}


def cpu_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def launch_local(runs: list[Run], specs: list[dict], jobs: int, devices_per_run: int | None, max_retries: int,
                 on_done) -> None:
    """Up to `jobs` runs at once; on CPU each gets cores / jobs threads, on GPUs its own
    `devices_per_run` devices (`gpu_slots`)."""
    free = gpu_slots(jobs, devices_per_run)
    lock = threading.Lock()

    def work(spec):
        with lock:
            slot = free.pop() if free else None
        if slot is not None:
            spec = {**spec, "env": {**spec["env"], "CUDA_VISIBLE_DEVICES": ",".join(slot)}}
        try:
            return execute(spec, max_retries)
        finally:
            if slot is not None:
                with lock:
                    free.append(slot)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {}
        for run, spec in zip(runs, specs):
            run.status = "running"
            futures[pool.submit(work, spec)] = run
        try:
            for future in concurrent.futures.as_completed(futures):
                on_done(futures[future], future.result())
        except KeyboardInterrupt:  # Ctrl-C: start nothing more, stop the runs going on (each resumable)
            _STOPPING.set()
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list(_CHILDREN):
                proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C: Lightning stops at the step's end
            raise


def gpu_slots(jobs: int, devices_per_run: int | None) -> list[list[str]]:
    """The GPUs of each of `jobs` local runs at once (CUDA_VISIBLE_DEVICES; `devices_per_run` None: 1,
    0: none), [] on a machine without GPUs; a plan this machine cannot hold is refused."""
    gpus = _cuda_devices()
    if devices_per_run and not gpus:
        raise ValueError(f"--devices-per-run {devices_per_run}: this machine has no GPU (the runs use its CPUs)")
    devices_per_run = 1 if devices_per_run is None else devices_per_run
    if gpus and jobs * devices_per_run > len(gpus):
        raise ValueError(f"--jobs {jobs} x --devices-per-run {devices_per_run} needs {jobs * devices_per_run} GPUs; "
                         f"this machine has {len(gpus)}")
    return [gpus[i * devices_per_run:(i + 1) * devices_per_run] for i in range(jobs)] if gpus else []


def _cuda_devices() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001  (no usable CUDA: CPU runs)
        n = 0
    if not n:
        return []
    return visible.split(",")[:n] if visible else [str(i) for i in range(n)]


def launch_ray(runs: list[Run], specs: list[dict], address: str | None, cpus_per_run: int,
               gpus_per_run: int | None, max_retries: int, on_done) -> None:
    """Every run is a Ray task with its CPUs/GPUs (`ray_resources_per_run`) on whatever cluster `address`
    names (default: a new local instance). Runs write to the shared --out directory, so a multi-node cluster needs it on a
    shared filesystem. Ray retries a task whose worker or node died (`max_retries`); a training
    process that dies inside a task is retried by `execute`."""
    try:
        installed = importlib.util.find_spec("ray") is not None
    except ValueError:  # a module entry of None: not importable
        installed = False
    if not installed:
        raise ValueError("--launcher ray needs Ray: pip install 'zoo[ray]' (or pip install ray)")
    if address and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ValueError(f"--ray-address {address}: cannot reach it ({e}); give HOST:PORT of a running Ray "
                             "head (`ray start --head`), or leave it out to start a local instance") from None
    # A new local instance serves this machine only, so it stays on the loopback address. Ray 2.60
    # ignores _node_ip_address there and advertises the machine's outward address unless its
    # multi-machine mode is off: that switch (named for Windows/macOS, where off is the default) is read
    # from the environment by Ray's processes, and by this one when it imports Ray.
    local = {RAY_LOCAL_ONLY: "0"} if not address else {}
    with unittest.mock.patch.dict(os.environ, local):
        import ray
        from ray._private import ray_constants

        with unittest.mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER
                                        and not local):  # for a Ray imported earlier in this process
            started = not ray.is_initialized()
            if started and address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            elif started:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
            try:
                _ray_launch(ray, runs, specs, cpus_per_run, gpus_per_run, max_retries, on_done)
            finally:
                if started:
                    ray.shutdown()  # here rather than at exit, where Ray 2.60's own shutdown hook fails


def ray_resources_per_run(nodes: list[dict], cpus: int, gpus: int | None) -> tuple[int, int]:
    """The CPUs and GPUs of each run's Ray task, given the cluster's live nodes' resources: `gpus` None
    means 1 where a node has GPUs, else 0. A run that no node can hold is refused: Ray would wait for
    such a node forever. (A cluster that autoscales to such nodes: start one first.)"""
    if gpus is None:
        gpus = int(any(n.get("GPU", 0) for n in nodes))
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        have = ", ".join(sorted({f"{n.get('CPU', 0):g} CPUs + {n.get('GPU', 0):g} GPUs" for n in nodes})) or "none"
        raise ValueError(f"--cpus-per-run {cpus} --devices-per-run {gpus}: no node of the Ray cluster has that "
                         f"many (its nodes: {have})")
    return cpus, gpus


def _ray_launch(ray, runs, specs, cpus_per_run, gpus_per_run, max_retries, on_done) -> None:
    cpus_per_run, gpus_per_run = ray_resources_per_run([n["Resources"] for n in ray.nodes() if n["Alive"]],
                                                       cpus_per_run, gpus_per_run)
    task = ray.remote(_ray_execute).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                                            retry_exceptions=False)
    pending = {}
    for run, spec in zip(runs, specs):
        (run.dir / RAY_NODES).unlink(missing_ok=True)  # an earlier compare's attempts are not this one's retries
        run.status = "running"
        pending[task.remote(spec, max_retries)] = run
    while pending:
        try:
            done, _ = ray.wait(list(pending), num_returns=1)
        except KeyboardInterrupt:  # Ctrl-C reaches this process only: stop the tasks on the cluster (resumable)
            for ref in pending:
                ray.cancel(ref)  # raises KeyboardInterrupt in the task: `execute` stops its run
            ray.wait(list(pending), num_returns=len(pending), timeout=120)
            raise
        run = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as e:
            result = {"summary": {"status": "failed", "error": f"Ray task failed: {' '.join(str(e).split())[:300]}"},
                      "retries": max_retries, "returncode": None}
        on_done(run, result)


def _ray_execute(spec: dict, max_retries: int) -> dict:
    """`execute` in a Ray task. Ray re-runs a task whose worker or node died, and `execute` then resumes
    from last.ckpt; each attempt appends its node to the run's RAY_NODES file, so that the report
    counts those retries too and says where the run ran."""
    import ray

    run_dir = Path(spec["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RAY_NODES, "a") as f:
        f.write(f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()}\n")
    result = execute(spec, max_retries)
    return {**result, "retries": result["retries"] + len(ray_nodes(run_dir)) - 1}


def ray_nodes(run_dir: Path) -> list[str]:
    path = run_dir / RAY_NODES
    return path.read_text().split() if path.exists() else []


def launch_slurm(runs: list[Run], specs: list[dict], folder: Path, cpus_per_run: int, params: dict,
                 max_retries: int, on_done) -> None:
    """Every run is a submitit job (`submitit.AutoExecutor`): a SLURM job where SLURM is installed,
    else a local process, as submitit decides. `params` are submitit's parameters (`slurm_partition`,
    `timeout_min`, `gpus_per_node`, `mem_gb`, ...); submitit's files and job logs go to `folder`. A job
    preempted or out of time is requeued by submitit and resumes from last.ckpt; a training process that
    dies inside a job is retried by `execute`. Runs write to the shared --out directory, as with Ray.
    (submitit hands each job its function as a pickle in `folder`, written here just before; what comes
    back is read from the run's own JSON, never from a pickle.)"""
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher slurm needs submitit: pip install 'zoo[slurm]' (or pip install submitit)") \
            from None

    class Job(submitit.helpers.Checkpointable):  # requeued on preemption and time-out rather than failed
        def __call__(self, spec: dict, max_retries: int) -> None:
            result = execute(spec, max_retries)
            atomic_write_text(Path(spec["dir"]) / JOB_RESULT, json.dumps(result))

    executor = submitit.AutoExecutor(folder=folder)
    try:
        executor.update_parameters(**{"cpus_per_task": cpus_per_run, **params})
    except Exception as e:  # noqa: BLE001  (submitit says NameError / AssertionError for bad parameters)
        raise ValueError(f"--slurm: {' '.join(str(e).split())}") from None
    print(f"compare: submitit runs the jobs on {executor.cluster}; their logs: {folder}", flush=True)
    jobs = {}
    for run, spec in zip(runs, specs):
        (run.dir / JOB_RESULT).unlink(missing_ok=True)  # an earlier compare's
        executor.update_parameters(name=f"zoo-{run.name}")
        run.status = "running"
        jobs[executor.submit(Job(), spec, max_retries)] = run
    try:
        for job in submitit.helpers.as_completed(list(jobs), poll_frequency=1):
            _slurm_done(jobs[job], job, on_done)
    except KeyboardInterrupt:  # Ctrl-C reaches this process only: cancel the jobs (scancel; each resumable)
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise


def _slurm_done(run: Run, job, on_done) -> None:
    path = run.dir / JOB_RESULT
    if path.exists():
        result = json.loads(path.read_text())
    else:  # the job itself ended (node lost, cancelled, out of requeues): its log says why
        result = {"summary": {"status": "failed", "error": f"job {job.job_id} ended {job.state} without "
                              f"finishing the run; log: {job.paths.stderr}"}, "retries": 0, "returncode": None}
    on_done(run, result)


def parse_slurm(items: list[str]) -> dict:
    """`--slurm KEY=VALUE` items -> submitit parameters; values are JSON where they parse (numbers,
    booleans, lists), else strings."""
    params = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--slurm {item!r}: expected KEY=VALUE, e.g. slurm_partition=gpu or timeout_min=240")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


# ------------------------------------------------------------------------------------------------
# results

def csv_versions(run_dir: Path, name: str) -> list[Path]:
    """The run's `csv/version_N/<name>` files, oldest first (by N: version_10 comes after version_9)."""
    return sorted((run_dir / "csv").glob(f"version_*/{name}"), key=lambda p: int(p.parent.name.split("_")[1]))


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from the run's CSV logs: a resumed run writes a new version, whose
    steps replace those logged again by it. A step is the number of optimizer steps taken when the
    value was measured (trainer.global_step, as in checkpoint names and summary.json): a value
    logged in training_step of the first batch, or by a validation right after it, is at step 1."""
    versions = csv_versions(run_dir, "metrics.csv")
    curves: dict[str, dict[int, float]] = {}
    for path in versions:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                # Lightning's CSV `step` counts the batches that stepped, raised only after a batch's
                # training_step metrics and its validation are logged (epoch-end ones are logged with it
                # lowered by one): training and validation rows alike are at global_step - 1. (Not so a
                # validation in the middle of a gradient accumulation window: it shows one step late.)
                step = int(row["step"]) + 1
                for key, value in row.items():
                    if key in ("epoch", "step") or value in ("", None):
                        continue
                    curves.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items()}


def best_of(curve: list[tuple[int, float]], mode: str) -> list | None:
    """[best value, its step] of a curve (lowest for mode "min"), ignoring non-finite values."""
    finite = [(v, s) for s, v in curve if math.isfinite(v)]
    if not finite:
        return None
    v, s = (min if mode == "min" else max)(finite, key=lambda vs: vs[0])
    return [v, s]


def load_finished(run: Run) -> bool:
    """Reads a finished run's summary (status ok) from an earlier compare: it is kept as it is."""
    path = run.dir / SUMMARY_FILE
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    if summary.get("status") != "ok":
        return False
    run.summary, run.status = summary, "ok"
    return True


def rows_for_stats(runs: list[Run], metric: str, mode: str) -> list[dict]:
    rows = []
    for r in runs:
        curves = read_curves(r.dir) if r.dir.exists() else {}
        best = best_of(curves.get(metric, []), mode)
        rows.append({"point": r.point, "seed": r.seed if r.seed is not None else 0,
                     "status": "ok" if r.ok else "failed", "metrics": r.summary.get("metrics", {}),
                     "best": {metric: best} if best else {}})
    return rows


def statistics(runs: list[Run], metric: str, mode: str, baseline: dict[str, str], alpha: float,
               also: tuple[tuple[str, str], ...] = ()) -> dict:
    """Aggregates per point and metric, and paired differences to each point's baseline on the
    monitored metric and on each (metric, mode) of `also`."""
    from zoo import stats

    finished = [r for r in runs if r.status in ("ok", "failed")]
    rows = rows_for_stats(finished, metric, mode)
    metrics = sorted({m for r in finished for m in r.summary.get("metrics", {}) if m.startswith("val/")})
    aggregate = [a for m in metrics for a in stats.aggregate(rows, m)]
    paired = []
    for point, values in dict((r.point, r.values) for r in runs).items():
        base_values = {**values, **baseline}  # the same point but for the baseline's keys
        if base_values == values:
            continue
        base_point = point_name(base_values)
        group = [row for row in rows if row["point"] in (point, base_point)]
        if {row["point"] for row in group} != {point, base_point}:
            continue  # a side with no finished run yet (a report written mid-sweep)
        for name, direction in ((metric, mode), *also):
            paired += [p for p in stats.paired(group, name, base_point, mode=direction, alpha=alpha)
                       if p["point"] == point]
    paired += interactions(runs, rows, baseline, ((metric, mode), *also), alpha)
    return {"aggregate": aggregate, "paired": paired, "verdicts": stats.verdicts(paired)}


def interactions(runs: list[Run], rows: list[dict], baseline: dict[str, str],
                 metrics: tuple[tuple[str, str], ...], alpha: float) -> list[dict]:
    """Whether a difference to the baseline depends on the other swept keys (does group beat batch by
    more at batch size 2 than at 8?): for each point whose other keys are not at their first values,
    its difference to its baseline minus that difference at the first values, seed by seed, with
    `stats.paired` (a paired t-test of the difference of differences). Named "P − B vs P0 − B0"."""
    from zoo import stats

    first = runs[0].values if runs else {}  # the plan's first point: every key at its first value
    by_point = {}
    for row in rows:
        by_point.setdefault(row["point"], {})[row["seed"]] = row
    gap = lambda p, b: f"{p} − {b}"  # noqa: E731
    out = []
    for point, values in dict((r.point, r.values) for r in runs).items():
        ref = {**values, **{k: v for k, v in first.items() if k not in baseline}}
        if {**values, **baseline} == values or ref == values:
            continue  # a baseline point, or one at the first values: no other setting to compare with
        pairs = [(point, point_name({**values, **baseline})), (point_name(ref), point_name({**ref, **baseline}))]
        if not all(p in by_point for pair in pairs for p in pair):
            continue
        for name, direction in metrics:
            diffs = [{"point": gap(p, b), "seed": seed, "status": "ok",
                      "metrics": {name: by_point[p][seed]["metrics"][name] - by_point[b][seed]["metrics"][name]}}
                     for p, b in pairs for seed in by_point[p] if seed in by_point[b]
                     and all(by_point[x][seed]["status"] == "ok" and name in by_point[x][seed]["metrics"] for x in (p, b))]
            if {d["point"] for d in diffs} == {gap(*pair) for pair in pairs}:
                out += [r for r in stats.paired(diffs, name, gap(*pairs[1]), mode=direction, alpha=alpha)
                        if r["point"] == gap(*pairs[0])]
    return out


# ------------------------------------------------------------------------------------------------
# report

def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    """Static PNGs for report.md, drawn as the dashboard draws them unsmoothed: per metric and point,
    the mean over its finished seeds (over all while none has finished) on the steps they share, a
    min-max band over them, and each seed as a thin line (dotted: not finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    curves = {run.name: read_curves(run.dir) for run in runs if run.dir.exists()}
    metrics = sorted({m for c in curves.values() for m in c if m.startswith(("train/", "val/"))})
    points = list(dict.fromkeys(r.point for r in runs))
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, point in enumerate(points):
            series = [(r, dict(curves[r.name][metric])) for r in runs
                      if r.point == point and curves.get(r.name, {}).get(metric)]
            if not series:
                continue
            use = [c for r, c in series if r.ok] or [c for _, c in series]
            steps = sorted(set.intersection(*(set(c) for c in use)))
            values = np.array([[c[x] for x in steps] for c in use]).reshape(len(use), len(steps))
            color = f"C{i % 10}"
            for r, c in series:
                ax.plot(list(c), list(c.values()), color=color, lw=0.8, alpha=0.5, ls="-" if r.ok else ":")
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.18, lw=0)
            n = sum(r.ok for r, _ in series)
            ax.plot(steps, values.mean(0), color=color, lw=2, marker="o" if len(steps) < 20 else None, markersize=3,
                    label=f"{point} ({f'n={n}' if n else 'unfinished'})")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(f"{metric}: mean over seeds, band min-max", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "plots" / f"{metric.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def latest_samples(run: Run, out: Path) -> list[Path]:
    """Copies the run's newest sample (image or text) per key into the report folder."""
    newest: dict[tuple[str, str], Path] = {}
    for p in sorted([*(run.dir / "samples").glob("*.png"), *(run.dir / "samples").glob("*.txt")]):
        newest[p.stem.rsplit("_epoch", 1)[0], p.suffix] = p  # sorted, so the last validation wins
    copied = []
    for (key, suffix), p in newest.items():
        dest = out / "samples" / f"{run.dir.name}__{key}{suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        copied.append(dest)
    return copied


def _fmt(value) -> str:
    """A number as the dashboard shows it (`fmt` in zoo.dashboard), so that report.md and report.html
    agree digit for digit: whole numbers with thousands separators, |x| >= 1000 to one decimal, else
    4 significant digits; ties away from zero on the exact binary value, as JavaScript's toFixed and
    toPrecision round (Python's format rounds them to even: 0.15625 would read 0.1562 here, 0.1563 there)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    if value == int(value):
        return f"{int(value):,}"
    exact = Decimal(value)
    decimals = 1 if abs(value) >= 1000 else 3 - exact.adjusted()
    rounded = exact.quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP)
    if abs(value) >= 1000:
        return f"{rounded:f}"
    if abs(rounded) >= Decimal("1e-6"):
        return f"{rounded.normalize():f}"
    sign, figures, exp = rounded.normalize().as_tuple()  # JavaScript's String(number): 1.5e-7 below 1e-6
    mantissa = ".".join(filter(None, [str(figures[0]), "".join(map(str, figures[1:]))]))
    return f"{'-' * sign}{mantissa}e{exp + len(figures) - 1}"


def _ci(a: dict | None) -> str:
    return "—" if not a or a.get("ci_low") is None else f"[{_fmt(a['ci_low'])}, {_fmt(a['ci_high'])}]"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for r in runs for m in r.summary.get("metrics", {}) if m.startswith("val/")})
    header = ["run", "status", *metrics, "val step", "train samples/s", "peak memory (MB)", "params", "wall time (s)"]
    rows = []
    for r in runs:
        s = r.summary
        status = {"ok": "ok", "pending": "pending", "running": "running"}.get(
            r.status, f"failed: {s.get('error') or 'no summary written'}")
        if r.retries:
            status += f" ({r.retries} retries)"
        rows.append([r.name, status, *(_fmt(s.get("metrics", {}).get(m)) for m in metrics), _fmt(s.get("val_step")),
                     _fmt(s.get("train_samples_per_s")), _fmt(s.get("peak_memory_mb")),
                     _fmt(s.get("params")), _fmt(s.get("wall_time_s"))])
    return header, rows


def aggregate_table(st: dict) -> tuple[list[str], list[list]]:
    header = ["point", "metric", "n", "mean", "std", "95% CI", "best mean", "best step (mean)", "failed seeds"]
    rows = [[a["point"], a["metric"], a["n"], a["mean"], a["std"], _ci(a),
             (a.get("best") or {}).get("mean"), (a.get("best_step") or {}).get("mean"),
             ", ".join(map(str, a.get("failed_seeds") or []))] for a in st["aggregate"]]
    return header, rows


def paired_table(st: dict) -> tuple[list[str], list[list]]:
    header = ["point", "baseline", "metric", "n", "mean diff", "95% CI", "p", "verdict"]
    rows = [[p["point"], p["baseline"], p["metric"], p["n"], p.get("mean_diff"), _ci(p), p.get("p_value"),
             p["verdict"]] for p in st["paired"]]
    return header, rows


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out).replace(os.sep, "/")


def dashboard_data(runs: list[Run], out: Path, title: str, description: str, metric: str, mode: str,
                   st: dict) -> dict:
    def links(r: Run) -> dict:
        configs = csv_versions(r.dir, "config.yaml")
        files = {"config": configs[-1] if configs else None, "command": r.dir / "command.txt",
                 "log": r.dir / "run.log", "checkpoint": r.dir / "checkpoints" / "last.ckpt"}
        found = {k: _rel(p, out) for k, p in files.items() if p is not None and p.exists()}
        found["samples"] = [_rel(p, out) for p in sorted((out / "samples").glob(f"{r.dir.name}__*"))]
        return found

    s = lambda r, k: r.summary.get(k)  # noqa: E731
    return {
        "title": title, "description": description, "metric": metric, "mode": mode,
        "done": sum(r.status in ("ok", "failed") for r in runs), "total": len(runs),
        "points": list(dict.fromkeys(r.point for r in runs)),
        "runs": [{"name": r.name, "point": r.point, "seed": r.seed, "status": r.status,
                  "error": r.summary.get("error") if r.status == "failed" else None, "retries": r.retries,
                  "values": r.values, "metrics": r.summary.get("metrics", {}), "val_step": r.summary.get("val_step"),
                  "curves": {k: [list(p) for p in v] for k, v in read_curves(r.dir).items()} if r.dir.exists() else {},
                  "stats": {"train samples/s": s(r, "train_samples_per_s"), "peak memory (MB)": s(r, "peak_memory_mb"),
                            "params": s(r, "params"), "wall time (s)": s(r, "wall_time_s")},
                  "links": links(r)} for r in runs],
        "aggregate": dict(zip(("columns", "rows"), aggregate_table(st))),
        "paired": dict(zip(("columns", "rows"), paired_table(st))),
        "verdicts": st["verdicts"],
    }


def write_report(runs: list[Run], out: Path, configs: list[str], overrides: list[str], sweeps: dict,
                 metric: str = "val/loss", mode: str = "min", baseline: dict | None = None, alpha: float = 0.05,
                 also: tuple[tuple[str, str], ...] = (), final: bool = True) -> Path:
    """results.json and the dashboard report.html; with `final`, also report.md with static plots."""
    from zoo.dashboard import write_dashboard

    baseline = baseline or parse_baseline(None, sweeps)
    st = statistics(runs, metric, mode, baseline, alpha, also)
    device = next((r.summary.get("device") for r in runs if r.summary.get("device")), "unknown")
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    sweep_text = "; ".join(f"{k} ∈ {{{', '.join(v)}}}" for k, v in sweeps.items())
    seed_text = f"seeds {', '.join(map(str, seeds))}" if seeds else "the config's seed"
    description = (f"Sweep: {sweep_text}; {seed_text}. Baseline: {point_name(baseline)}. Overrides for every run: "
                   f"{' '.join(overrides) or 'none'}. Device: {device}. Monitored: {metric} ({mode}).")
    for r in runs:  # mid-sweep too: the dashboard links each finished run's samples
        if r.status in ("ok", "failed"):
            latest_samples(r, out)
    write_dashboard(dashboard_data(runs, out, f"Comparison: {', '.join(configs)}", description, metric, mode, st), out)
    atomic_write_text(out / "results.json", json.dumps({
        "runs": {r.name: {"point": r.point, "seed": r.seed, "values": r.values, "retries": r.retries, "node": r.node,
                          "status": r.status,
                          **r.summary} for r in runs},
        "aggregate": st["aggregate"], "paired": st["paired"], "verdicts": st["verdicts"]}, indent=2, default=str))
    if not final:
        return out / "report.html"

    plots = plot_curves(runs, out)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731

    def md_table(header, rows):
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
            "| " + " | ".join(esc(_fmt(c) if not isinstance(c, str) else c) for c in row) + " |" for row in rows]

    md = [f"# Comparison: {', '.join(configs)}", "", description,
          "Same config and data split for every run; runs with the same seed share data order and "
          "initialisation. Each run's files are under `runs/<name>/`; `report.html` is the interactive "
          "dashboard.", "", "## Which differences are real", ""]
    md += [f"- {v}" for v in st["verdicts"]] or ["- (no paired comparison: one sweep point, or no finished runs)"]
    md += ["", f"Paired over seeds (same seed = same data order): difference to the baseline, its 95 % CI, "
           f"and a two-sided paired t-test at {alpha}; p-values are per comparison, not corrected for "
           "multiple comparisons. With two or more swept keys, a row `P − B vs P0 − B0` tests whether a difference "
           "depends on the other keys (the interaction): the difference at P minus the one at P0, the same point "
           "with the other keys at their first values, seed by seed.", ""]
    md += md_table(*paired_table(st))
    md += ["", "## Per sweep point (over seeds)", "",
           f"Final values (`val/`: at the last validation); `best` is the best {metric} ({mode}) "
           "over the run's validations and the step it was reached at, each averaged over seeds (a mean step "
           "need not be one that validated).", ""]
    md += md_table(*aggregate_table(st))
    md += ["", "## Runs", ""]
    md += md_table(*table(runs))
    md += ["", "The `val/` values are those of each run's last validation, at `val step` (a run that ends "
           "between validations trained on after it). Throughput counts training batches only (data loading "
           "included, first batch of each epoch excluded; a resumed run's last segment). Wall time: of fit (process "
           "start-up excluded), summed over a resumed run's segments. Peak memory: CUDA allocator peak on GPU; on CPU, "
           "the process's peak resident memory (data, model and framework included).", "", "## Curves", ""]
    md += [f"![{p.stem}]({_rel(p, out)})" for p in plots]
    md += ["", "## Samples (latest validation)", ""]
    for r in runs:
        paths = sorted((out / "samples").glob(f"{r.dir.name}__*"))
        if paths:
            md += [f"### {r.name}", ""]
        for p in paths:
            if p.suffix == ".txt":
                md += [f"`{p.stem}`:", "", "```text", p.read_text().rstrip(), "```", ""]
            else:
                md += [f"![{p.stem}]({_rel(p, out)})", ""]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"


# ------------------------------------------------------------------------------------------------
# entry point

def main(argv: list[str], prog: str = "train.py compare") -> int:
    from zoo.cli import IMPORT_HELP, ArgumentParser, import_modules

    p = ArgumentParser(
        prog=prog,
        description="Train one config once per norm (or per point of --sweep) and per seed, same data, and "
        "write DIR/report.html + report.md. Any other --trainer.*/--model.*/--data.* argument applies to every run.",
    )
    p.add_argument("--config", action="append", required=True, help="config file (repeatable, as for fit)")
    p.add_argument("--norms", help="comma-separated norm kinds: shorthand for --sweep model.net.norm=a,b,c "
                   "(model.norm for tasks without a network config)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep any argument (repeatable; sweeps are crossed), e.g. data.batch_size=1,2,8 "
                   "(default: the config's compare.sweep)")
    p.add_argument("--seeds", help="N (seeds 0..N-1) or a list 0,1,2: every sweep point once per seed "
                   "(default: once, with the config's seed)")
    p.add_argument("--baseline", help="KEY=VALUE each point is compared with, seed by seed "
                   "(default: the first value of the first swept key)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired tests")
    p.add_argument("--metric", action="append", default=[], metavar="NAME:min|max",
                   help="also test this metric's final value seed by seed (repeatable; the task's monitored "
                   "metric always is), e.g. val/L_R:min")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--jobs", type=int, help="local: runs at once on this machine (CPU cores are split; default 1)")
    p.add_argument("--devices-per-run", type=int, help="local, ray: GPUs per run (default: 1 where there are GPUs; "
                   "0: the runs use CPUs)")
    p.add_argument("--launcher", choices=("local", "ray", "slurm"), default="local",
                   help="local: --jobs at once here; ray: Ray tasks; slurm: submitit jobs (SLURM where installed)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local instance)")
    p.add_argument("--cpus-per-run", type=int, help="ray, slurm: CPUs per run (default 1)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit parameter of every job (repeatable), e.g. slurm_partition=gpu, timeout_min=240, "
                   "gpus_per_node=1, mem_gb=32")
    p.add_argument("--max-retries", type=int, default=1, help="retries of a run whose process dies")
    p.add_argument("--fresh", action="store_true", help="delete the comparison in --out and start over")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help=IMPORT_HELP + " (every run imports it too)")
    args, overrides = p.parse_known_args(argv)
    stray = [o for o in overrides if o.startswith("-") and not o.startswith("--")]
    if stray:
        raise ValueError(f"unrecognised arguments {stray}; overrides look like --trainer.max_steps=100")
    for option in (o.split("=", 1)[0] for o in overrides if o.startswith("--") and "." not in o.split("=", 1)[0]):
        near = difflib.get_close_matches(option, [o for a in p._actions for o in a.option_strings], n=1)
        if near:  # (fit's own top-level options are not this close to compare's)
            raise ValueError(f"unrecognised argument {option}; did you mean {near[0]}?")
    for name, launchers in LAUNCHER_OPTIONS.items():
        value = getattr(args, name)
        if value not in (None, []) and args.launcher not in launchers:
            raise ValueError(f"--{name.replace('_', '-')} is for --launcher {' or '.join(launchers)}, not "
                             f"{args.launcher}")
        least = 0 if name == "devices_per_run" else 1  # 0 GPUs: the runs use CPUs
        if isinstance(value, int) and value < least:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least {least}")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries {args.max_retries}: must be at least 0")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha {args.alpha}: must be between 0 and 1 (e.g. 0.05)")
    import_modules(args.imports)
    sweeps, metric, mode, config_seed = check_arguments(args.config, overrides, args.norms, args.sweep)
    seeds = parse_seeds(args.seeds)
    slurm = parse_slurm(args.slurm)
    if "cpus_per_task" in slurm and args.cpus_per_run is not None:
        raise ValueError(f"--cpus-per-run {args.cpus_per_run} and --slurm cpus_per_task={slurm['cpus_per_task']} "
                         "both set a job's CPUs; give one")
    also = parse_metrics(args.metric)
    for i, (name, _) in enumerate(also):
        if name == metric or name in [n for n, _ in also[:i]]:
            raise ValueError(f"--metric {args.metric[i]}: " + (f"{metric} is the task's monitored metric, always "
                             f"tested ({mode})" if name == metric else f"{name} is given twice"))
        if name.startswith("train/"):
            print(f"compare: warning: --metric {name}: a training metric's final value is measured on the last "
                  "training batches, not on held-out data; a val/ metric compares the models", file=sys.stderr)
    baseline = parse_baseline(args.baseline, sweeps)
    if args.norms:
        from zoo.norm import NORM_KINDS

        key = next(iter(sweeps))  # --norms comes first
        unknown = [v for v in sweeps[key] if v not in NORM_KINDS]
        if unknown:
            raise ValueError(f"unknown norm(s) {unknown}; valid kinds: {', '.join(NORM_KINDS)} (a norm you registered "
                             "yourself: give the module that registers it with --import MODULE)")
    for key, values in sweeps.items():
        warn_unregistered_norms(key, values)
    if args.launcher == "local":
        gpu_slots(args.jobs or 1, args.devices_per_run)  # refused now, not once runs are due (or never)
    out = Path(args.out)
    runs = plan_runs(sweeps, out, seeds, config_seed)
    group = prepare_out(out, args.config, overrides, args.fresh, runs)
    todo = [r for r in runs if not load_finished(r)]
    kept = len(runs) - len(todo)
    print(f"{len(runs)} runs" + (f"; {kept} finished before, kept as they are" if kept else ""), flush=True)
    # Threads per run: the user's OMP_NUM_THREADS, else the cores split between runs. Sent with every
    # run (also to other Ray nodes), with the settings that change what a run does.
    cpus = slurm.get("cpus_per_task", args.cpus_per_run or 1)
    threads = cpu_threads(args.jobs or 1) if args.launcher == "local" else cpus
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(threads),
           **{k: os.environ[k] for k in ("WANDB_MODE", "ZOO_CPU_KERNELS", "PYTHONPATH") if k in os.environ}}
    specs = [run_spec(r, args.config, overrides, group, env, sweeps, args.imports) for r in todo]
    report_kw = dict(metric=metric, mode=mode, baseline=baseline, alpha=args.alpha)

    def on_done(run: Run, result: dict) -> None:
        run.summary, run.retries = result["summary"], result["retries"]
        run.status = "ok" if run.ok else "failed"
        done = sum(r.status in ("ok", "failed") for r in runs)
        state = "ok" if run.ok else f"FAILED ({run.summary.get('error')}); log: {run.dir / 'run.log'}"
        print(f"[{done}/{len(runs)}] {run.name}: {state}" + (f" ({run.retries} retries)" if run.retries else ""),
              flush=True)
        update_report()

    def update_report() -> None:
        try:
            write_report(runs, out, args.config, overrides, sweeps, final=False, also=logged_only(runs, also)[0],
                         **report_kw)
        except Exception as e:  # noqa: BLE001  (the runs must go on; the final report raises it again)
            print(f"compare: warning: the dashboard could not be updated: {type(e).__name__}: {e}", file=sys.stderr)

    try:
        if todo and args.launcher == "ray":
            launch_ray(todo, specs, args.ray_address, cpus, args.devices_per_run, args.max_retries, on_done)
        elif todo and args.launcher == "slurm":
            launch_slurm(todo, specs, out / "slurm", cpus, slurm, args.max_retries, on_done)
        elif todo:
            launch_local(todo, specs, args.jobs or 1, args.devices_per_run, args.max_retries, on_done)
    except KeyboardInterrupt:
        for r in runs:
            r.status = "pending" if r.status == "running" else r.status
        update_report()
        done = sum(r.status in ("ok", "failed") for r in runs)
        print(f"error: interrupted with {done} of {len(runs)} runs done; the same command resumes the others "
              "(finished runs are kept)", file=sys.stderr)
        return 130
    logged, unlogged = logged_only(runs, also)
    report = write_report(runs, out, args.config, overrides, sweeps, also=logged, **report_kw)
    print(f"checkpoints: {(out / 'runs').resolve()}/<run>/checkpoints/last.ckpt")
    print(f"report: {(out / 'report.html').resolve()}\n        {report.resolve()}")
    if any(r.ok for r in runs):  # (with no run ok, the runs' failures are what to report)
        names = sorted({m for r in runs if r.ok for m in r.summary.get("metrics", {}) if m.startswith("val/")})
        logs = f"the runs log {', '.join(names)}" if names else ("the runs log no val/ metric: they ended before their "
                                                                 "first validation (--trainer.val_check_interval)")
        if logged_only(runs, ((metric, mode),))[1]:  # a comparison of nothing is not a result
            raise ValueError(f"{metric}, the task's monitored metric: no run logged it, so nothing is compared; {logs}")
        if unlogged:
            raise ValueError(f"--metric {', '.join(map(repr, unlogged))}: no run logged "
                             f"{'it' if len(unlogged) == 1 else 'them'}; {logs}")
    failed = [r for r in runs if not r.ok]
    if failed:  # reported after the others finished, and said by the exit status (as Ray Tune raises)
        print(f"error: {len(failed)} of {len(runs)} runs failed ({failed[0].name}: {failed[0].summary.get('error')}"
              f"{'; ...' if len(failed) > 1 else ''}); the report lists each, and the same command re-runs them",
              file=sys.stderr)
        return 1
    return 0


def logged_only(runs: list[Run], also: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """`also` split into the (metric, mode)s some finished run logged (in its summary) and the names of
    the others: a name no run logs is a mistake to report, not a comparison whose every seed failed."""
    logged = {m for r in runs if r.ok for m in r.summary.get("metrics", {})}
    return tuple(a for a in also if a[0] in logged), [name for name, _ in also if name not in logged]


def warn_unregistered_norms(key: str, values: list[str]) -> None:
    """A swept `model.*norm` value that is not registered here is probably a typo, but may be a norm
    the config's own module registers in the run's process: say so, and let the run decide."""
    from zoo.norm import NORM_KINDS

    unknown = [v for v in values if v not in NORM_KINDS]
    if key.startswith("model.") and key.endswith("norm") and unknown:
        print(f"compare: warning: {key} value(s) {unknown} are not registered norms ({', '.join(NORM_KINDS)}); "
              "their runs will fail unless a module given with --import registers them", file=sys.stderr)
