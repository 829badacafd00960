"""Orbax checkpoints of everything needed to continue a run exactly.

Each step directory holds three items:

- ``state``: the train-state pytree (params, optimizer state, step, RNG, NaN marker),
  saved and restored sharded through ``StandardSave``/``StandardRestore`` against the
  abstract state, so a restore lands straight in the run's shardings;
- ``loop``: the trainer's JSON state, one file per process (``process_{i}-of-{n}.json``),
  written by :class:`LoopStateHandler`: the data iterator's position (a global stream
  position, so a run restores onto any process count) and the hooks' state (best metric,
  early stopping, clock);
- ``config``: the resolved run config (JSON).

Directories are ``etils.epath`` paths (local or object stores).

Saves are asynchronous (``train.async_checkpoint``); commits are atomic (orbax writes to a
temporary directory and renames). A failed save raises at the next save or at
:meth:`Checkpointer.close`, which fails the run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from recjax.config import Config
from recjax.errors import CheckpointMismatchError

PER_PROCESS = ("clock",)  # loop-state entries each process measures for itself


class LoopStateHandler(ocp.CheckpointHandler):
    """Per-process JSON of the trainer's loop state (no grain dependency)."""

    def save(self, directory: epath.Path, args: LoopStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: LoopStateRestore | None = None) -> dict[str, Any]:
        """This process's own state; after a change of process count, the state every saving
        process agreed on (the iterators' states are global stream positions, see
        :mod:`recjax.data.pipeline`; the hooks' states are the same on every process) with
        process 0's :data:`PER_PROCESS` entries (its own timings)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if (directory / name).exists():
            return json.loads((directory / name).read_text())
        saved = {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("process_*-of-*.json"))}
        shared = lambda state: {k: v for k, v in state.items() if k not in PER_PROCESS}
        distinct = {json.dumps(shared(v), sort_keys=True) for v in saved.values()}
        if len(distinct) != 1:
            raise CheckpointMismatchError(
                f"cannot restore the loop state in {directory} onto "
                f"{jax.process_count()} process(es): "
                + ("no state was saved" if not saved else f"the saving processes disagree ({saved})")
                + ". Resume with the process count that wrote it, or set train.resume=false."
            )
        first = saved[f"process_0-of-{len(saved)}.json"] if f"process_0-of-{len(saved)}.json" in saved else {}
        return {**json.loads(distinct.pop()), **{k: first[k] for k in PER_PROCESS if k in first}}

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(LoopStateHandler, for_save=True)
@dataclasses.dataclass
class LoopStateSave(ocp.args.CheckpointArgs):
    state: dict[str, Any]


@ocp.args.register_with_handler(LoopStateHandler, for_restore=True)
@dataclasses.dataclass
class LoopStateRestore(ocp.args.CheckpointArgs):
    pass


def _describe(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"params.top.layers.0.kernel" -> shape`` (tuples, lists and dicts all print alike)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): tuple(getattr(leaf, "shape", ()))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_compatible(saved: Any, expected: Any, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first parameters that differ."""
    got, want = _describe(saved), _describe(expected)
    problems: list[str] = []
    # parameters first: the optimizer state mirrors them and would crowd them out of the message
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params."), k))
    for k in order(want.keys() - got.keys()):
        problems.append(f"{k}: in the model {want[k]} but missing from the checkpoint")
    for k in order(got.keys() - want.keys()):
        problems.append(f"{k}: in the checkpoint {got[k]} but not in the model")
    for k in order(want.keys() & got.keys()):
        if got[k] != want[k]:
            problems.append(f"{k}: checkpoint shape {got[k]} != model shape {want[k]}")
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the model:\n  " + "\n  ".join(problems[:8]) + more
            + "\nUse a new run_dir, or the config the checkpoint was written with "
            "(saved beside it as config.json)."
        )


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the train state + loop state + config
    in ``directory`` (an ``epath.Path``)."""

    def __init__(self, directory: epath.Path, *, keep: int, async_save: bool):
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "loop": LoopStateHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, loop_state: dict[str, Any], cfg: Config) -> None:
        self.manager.check_for_errors()
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loop=LoopStateSave(loop_state),
                config=ocp.args.JsonSave(cfg.to_dict()),
            ),
            force=True,
        )
        if not saved:
            raise RuntimeError(f"checkpoint at step {step} was not saved (orbax declined)")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into the shardings of ``abstract_state``; returns (state, loop state)."""
        meta = self.manager.item_metadata(step)
        saved_tree = meta["state"] if meta is not None and "state" in meta else None
        if saved_tree is not None:
            check_compatible(saved_tree, abstract_state, str(self.directory / str(step)))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), loop=LoopStateRestore()
            ),
        )
        return restored["state"], restored["loop"]

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def close(self) -> None:
        self.wait()
        self.manager.close()
