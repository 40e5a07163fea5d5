"""The sweep file: what it may hold, how it is read, and the runs it plans.

    name: demo-controls          # folder-safe; the runs go to <dir>/<name>/
    dir: runs/sweeps             # relative to the working directory, like the trainer's dir=
    base: ../demo_vlm.yaml       # the recipe, relative to this sweep file (then to the cwd)
    overrides: {steps: 500}      # dotted keys (or nested sections), applied to every run
    variants:                    # named override sets, for values that move together
      top2: {model.router_topk: 2, model.null_experts.num_null_experts: 0}
      null: {model.router_topk: 4, model.null_experts.num_null_experts: 8}
    grid:                        # optional, cartesian over its axes; an axis is a dotted key with
      optim.lr: [0.003, 0.001]   #   a list of values, or a name with labelled override sets:
      size: {small: {model.num_layers: 12}, base: {model.num_layers: 24}}
    seeds: [1, 2, 3]
    iso_flop: {tolerance: 0.01, groups: {k2: [top2, null]}}   # optional, see checks.py
    compare: {gate: [top4, top2], null: [null, top2]}  # optional: `report` gives A - B per pair,
                                 #   paired by seed, with its 95% interval and a verdict
    launch: {nproc_per_node: 2}  # optional: processes per run (local); nodes, gpus_per_node,
                                 #   time, partition, account, sbatch (extra #SBATCH lines)

A run is (variant, grid point, seed), in the folder <dir>/<name>/<variant>[__<axis>=<label>...]/
seed<S>. Its config is recipe <- overrides <- variant <- grid point <- command-line overrides <-
seed, dir and name, which the sweep sets (a sweep file that sets them is refused). Every key is
checked by the trainer's own `load_config`, so an unknown key names the closest valid one.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.run.config import ConfigError, RunConfig, load_config

TOP_KEYS = ("name", "dir", "base", "overrides", "variants", "grid", "seeds", "iso_flop", "compare",
            "launch")
LAUNCH_KEYS = {"nproc_per_node": int, "nodes": int, "gpus_per_node": int, "time": str,
               "partition": str, "account": str, "sbatch": list}
RESERVED = ("seed", "dir", "name")  # set per run by the sweep
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class SweepError(NullMoEError, ValueError):
    """A sweep file that does not describe a valid set of runs; the message names the key."""


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1  # local: 1 = one plain process, more = torchrun --standalone
    nodes: int = 1  # slurm, per run
    gpus_per_node: int = 8  # slurm
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    sbatch: tuple[str, ...] = ()


@dataclass(frozen=True)
class IsoFlop:
    tolerance: float
    groups: dict[str, list[str]]


@dataclass(frozen=True)
class Run:
    variant: str
    point: tuple[tuple[str, str], ...]  # (axis, label) per grid axis
    seed: int
    folder: Path  # <dir>/<name>/<label>/seed<S>
    overrides: tuple[str, ...]  # key=value for the trainer, after --config <base>
    cfg: RunConfig = field(compare=False, repr=False)
    after: Optional[str] = None  # key of the run whose checkpoint this one starts from

    @property
    def label(self) -> str:
        return run_label(self.variant, self.point)

    @property
    def key(self) -> str:
        return f"{self.label}/seed{self.seed}"


def run_label(variant: str, point: tuple[tuple[str, str], ...]) -> str:
    """The folder of a (variant, grid point): variant[__axis=label...]."""
    return "__".join([variant, *(f"{axis}={value}" for axis, value in point)])


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    root: Path  # <dir>/<name>
    base: Path
    overrides: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    grid: list[tuple[str, list[tuple[str, dict[str, Any]]]]]
    seeds: list[int]
    iso_flop: Optional[IsoFlop]
    launch: Launch
    compare: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (A, B)
    extra: tuple[str, ...] = ()  # command-line key=value, after the sweep's own


# ----------------------------------------------------------------------------- reading
def load_sweep(path: str | Path, extra: list[str] | tuple[str, ...] = (),
               dir: Optional[str] = None, seeds: Optional[list[int]] = None) -> Sweep:
    """Reads and checks the sweep file's structure (not yet the configs: see `plan`); `dir`
    replaces the file's dir (a smoke test of a real sweep somewhere else), `seeds` its seeds
    (more seeds for a study whose intervals are too wide, without editing the file)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep file {str(path)!r} must hold a mapping ({', '.join(TOP_KEYS)})")
    _known("", raw, TOP_KEYS)
    for key in ("name", "base", "seeds"):
        if key not in raw:
            raise SweepError(f"{key}: missing (a sweep needs name, base and seeds)")
    name = _safe("name", raw["name"])
    if not isinstance(raw.get("dir", ""), str):
        raise SweepError(f"dir={raw['dir']!r}: give a folder path")
    base = _base(path, raw["base"])
    variants_raw = raw.get("variants") or {"base": {}}
    if not isinstance(variants_raw, dict):
        raise SweepError("variants: give a mapping of names to override sets")
    variants = {}
    for vname, items in variants_raw.items():
        _safe(f"variants.{vname}", vname)
        variants[vname] = _flatten(f"variants.{vname}", items)
    seeds = raw["seeds"] if seeds is None else seeds
    if not isinstance(seeds, list) or not seeds:
        raise SweepError(f"seeds={seeds!r}: give a non-empty list of integers, e.g. [1, 2, 3]")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise SweepError(f"seeds={seeds!r}: give distinct integers")
    extra = tuple(extra)
    for item in extra:
        key = item.partition("=")[0].strip()
        if key in RESERVED:
            raise SweepError(f"command-line override {item!r}: {key} is set by the sweep")
    return Sweep(path=path, name=name, root=Path(dir or raw.get("dir", "runs/sweeps")) / name, base=base,
                 overrides=_flatten("overrides", raw.get("overrides")), variants=variants,
                 grid=_grid(raw.get("grid")), seeds=seeds,
                 iso_flop=_iso_flop(raw.get("iso_flop"), variants), launch=_launch(raw.get("launch")),
                 compare=_compare(raw.get("compare"), variants), extra=extra)


def _known(where: str, raw: dict, valid) -> None:
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else ""
            raise SweepError(f"unknown sweep key '{where}{key}'{hint} (valid: "
                             f"{', '.join(where + k for k in valid)})")


def _safe(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or "__" in value:
        raise SweepError(f"{where}={value!r}: give a folder-safe name (letters, digits, _ . + -; "
                         "no '__', which separates grid points in folder names)")
    return value


def _base(sweep_path: Path, base: Any) -> Path:
    if not isinstance(base, str):
        raise SweepError(f"base={base!r}: give the recipe's path")
    for candidate in (sweep_path.parent / base, Path(base)):
        if candidate.is_file():
            return candidate.resolve()
    raise SweepError(f"base={base!r}: no such recipe next to the sweep file "
                     f"({sweep_path.parent / base}) or in the working directory")


def _flatten(where: str, value: Any) -> dict[str, Any]:
    """Nested sections and dotted keys alike -> {dotted key: value}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where}: give a mapping of dotted keys to values (key.sub: value), "
                         f"not {value!r}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise SweepError(f"{where}: key {key!r} is not a name (quote it in YAML?)")
        if key in RESERVED:
            raise SweepError(f"{where}.{key}: set by the sweep for every run ("
                             + ("use seeds: [...]" if key == "seed" else "from dir and name") + ")")
        if isinstance(item, dict):
            out.update({f"{key}.{sub}": v for sub, v in _flatten(f"{where}.{key}", item).items()})
        else:
            out[key] = item
    return out


def _grid(raw: Any) -> list[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise SweepError("grid: give a mapping of axes (dotted key: [values], or name: {label: "
                         "{overrides}})")
    axes = []
    for axis, values in raw.items():
        where = f"grid.{axis}"
        _safe(where, axis)
        if isinstance(values, list):
            if not values:
                raise SweepError(f"{where}: empty list; give at least one value, or drop the axis")
            labels = [(re.sub(r"[^A-Za-z0-9_.+-]", "_", to_yaml(v)), {axis: v}) for v in values]
        elif isinstance(values, dict):
            if not values:
                raise SweepError(f"{where}: empty mapping; give at least one labelled override set")
            labels = [(_safe(f"{where}.{label}", label), _flatten(f"{where}.{label}", items))
                      for label, items in values.items()]
        else:
            raise SweepError(f"{where}={values!r}: give a list of values, or a mapping of labels "
                             "to override sets")
        names = [label for label, _ in labels]
        if len(set(names)) < len(names):
            raise SweepError(f"{where}: values {names} give the same folder name twice")
        axes.append((axis, labels))
    return axes


def _iso_flop(raw: Any, variants: dict) -> Optional[IsoFlop]:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SweepError(f"iso_flop={raw!r}: give {{tolerance: 0.01, groups: {{name: [variants]}}}}")
    _known("iso_flop.", raw, ("tolerance", "groups"))
    tol = raw.get("tolerance", 1e-6)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise SweepError(f"iso_flop.tolerance={tol!r}: give a relative tolerance >= 0, e.g. 0.01")
    groups = raw.get("groups") or {"all": list(variants)}
    if not isinstance(groups, dict):
        raise SweepError("iso_flop.groups: give a mapping of group names to lists of variants")
    for group, names in groups.items():
        if not isinstance(names, list) or len(names) < 2:
            raise SweepError(f"iso_flop.groups.{group}: give a list of at least two variants")
        for v in names:
            if v not in variants:
                close = difflib.get_close_matches(str(v), list(variants), n=1)
                raise SweepError(f"iso_flop.groups.{group}: unknown variant {v!r}"
                                 + (f"; did you mean {close[0]!r}?" if close else "")
                                 + f" (variants: {', '.join(variants)})")
    return IsoFlop(float(tol), {str(g): list(n) for g, n in groups.items()})


def _compare(raw: Any, variants: dict) -> dict[str, tuple[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"compare={raw!r}: give a mapping of names to [A, B] variant pairs")
    out = {}
    for name, pair in raw.items():
        _safe(f"compare.{name}", name)
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
            raise SweepError(f"compare.{name}={pair!r}: give two different variants, [A, B]")
        for v in pair:
            if v not in variants:
                raise SweepError(f"compare.{name}: unknown variant {v!r}; the sweep's variants are "
                                 f"{', '.join(variants)}")
        out[str(name)] = (pair[0], pair[1])
    return out


def _launch(raw: Any) -> Launch:
    if raw is None:
        return Launch()
    if not isinstance(raw, dict):
        raise SweepError(f"launch={raw!r}: give a mapping ({', '.join(LAUNCH_KEYS)})")
    _known("launch.", raw, tuple(LAUNCH_KEYS))
    for key, value in raw.items():
        want = LAUNCH_KEYS[key]
        if want is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SweepError(f"launch.{key}={value!r}: give an integer >= 1")
        if want is str and not isinstance(value, (str, int)):
            raise SweepError(f"launch.{key}={value!r}: give a string")
        if want is list and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise SweepError(f"launch.{key}={value!r}: give a list of #SBATCH option strings")
    values = {k: (tuple(v) if k == "sbatch" else str(v) if LAUNCH_KEYS[k] is str else v)
              for k, v in raw.items()}
    return Launch(**values)


# ----------------------------------------------------------------------------- planning
def to_yaml(value: Any) -> str:
    """A value as the trainer's `key=value` parser (yaml.safe_load) reads it back."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


def args(items: dict[str, Any]) -> list[str]:
    return [f"{key}={to_yaml(value)}" for key, value in items.items()]


def _config(sweep: Sweep, where: str, overrides: list[str]) -> RunConfig:
    try:
        return load_config(str(sweep.base), overrides)
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None


def plan(sweep: Sweep) -> list[Run]:
    """Every (seed, grid point, variant), each config built and checked by the trainer's loader.

    Seeds are the outer loop, so a sweep cut short has whole seeds of every variant."""
    common = args(sweep.overrides)
    _config(sweep, "overrides", common)
    for vname, items in sweep.variants.items():
        _config(sweep, f"variants.{vname}", common + args(items))
    for axis, labels in sweep.grid:
        for label, items in labels:
            _config(sweep, f"grid.{axis}" + ("" if axis in items else f".{label}"), common + args(items))
    if sweep.extra:
        _config(sweep, "command-line overrides", common + list(sweep.extra))
    sources = _init_sources(sweep)
    runs = []
    points = list(itertools.product(*(labels for _, labels in sweep.grid)))
    for seed in sweep.seeds:
        for point in points:
            for vname, items in sweep.variants.items():
                label = tuple((axis, lab) for (axis, _), (lab, _) in zip(sweep.grid, point))
                if vname in sources:
                    items = {k: v for k, v in items.items() if k != "checkpoint.init_from"}
                overrides = common + args(items)
                for _, point_items in point:
                    overrides += args(point_items)
                key = f"{run_label(vname, label)}/seed{seed}"
                folder = sweep.root / key
                overrides += [*sweep.extra, f"seed={seed}", f"dir={to_yaml(str(folder))}",
                              f"name={to_yaml(f'{sweep.name}/{key}')}"]
                after = None
                if vname in sources:  # the same seed and grid point of the source variant
                    after = f"{run_label(sources[vname], label)}/seed{seed}"
                    overrides.append(f"checkpoint.init_from={to_yaml(str(sweep.root / after))}")
                cfg = _config(sweep, f"run {key}", overrides)
                runs.append(Run(vname, label, seed, folder, tuple(overrides), cfg, after))
    return runs


def _init_sources(sweep: Sweep) -> dict[str, str]:
    """{variant: source variant} for variants whose `checkpoint.init_from` is "@SOURCE": each of
    their runs starts from the finished run of SOURCE with the same seed and grid point."""
    sources = {}
    for vname, items in sweep.variants.items():
        value = items.get("checkpoint.init_from")
        if not (isinstance(value, str) and value.startswith("@")):
            continue
        source = value[1:]
        if source not in sweep.variants:
            raise SweepError(f"variants.{vname}: checkpoint.init_from={value!r} names no variant "
                             f"(variants: {', '.join(sweep.variants)})")
        if source == vname or str(sweep.variants[source].get("checkpoint.init_from", "")
                                  ).startswith("@"):
            raise SweepError(f"variants.{vname}: checkpoint.init_from={value!r}: the source must "
                             "be a variant that starts from scratch (one level of starting from)")
        sources[vname] = source
    return sources
