"""The config key a run folder's checkpoints carry, read without torch.

Every checkpoint folder (Ray Train's `checkpoint_*`, local mode's `checkpoint_local_*`) holds
`state.pt` and a `key` file with the key of the config that made it (raylt.preflight's
`fit_key` for the head). A command compares it with its own config's key before importing
torch or starting Ray, so a folder holding another config's run is refused at once.
"""

from __future__ import annotations

from pathlib import Path

from raylt.errors import RayltError

KEY_FILE = "key"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of an earlier run in `run_dir`, if any."""
    states = sorted(Path(run_dir).glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    return states[-1].parent if states else None


def checkpoint_key(folder: Path) -> str:
    """The key a checkpoint was made with: its `key` file, or (a checkpoint written before
    there were key files) the key inside its state."""
    f = folder / KEY_FILE
    if f.is_file():
        return f.read_text().strip()
    import torch  # only for such older checkpoints

    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["key"]


def refuse_other_config(run_dir: Path, key: str, where: Path) -> None:
    """A one-line error when `run_dir` holds checkpoints of a config whose key is not `key`."""
    newest = newest_checkpoint(run_dir)
    if newest is not None and checkpoint_key(newest) != key:
        raise RayltError(
            f"{where} holds checkpoints of a different config; pass another `name` (or --out) to start a new run"
        )
