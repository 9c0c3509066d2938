"""Keep Python's cyclic garbage collector off the objects that live for the whole training run.

A built trainer tracks about 470 k Python objects (the model's modules and parameters,
transformers', peft's and the tokenizer's objects). Every collection of the oldest generation
walks all of them: on the 2-core EPYC that took 215 ms, once every five steps or so of the
benchmark's GRPO (SmolLM2-135M, at 32 and at 256 new tokens alike: a step makes about as many
container objects whatever the length), in the middle of whatever the step was doing.
``gc.freeze`` moves every object tracked so far into a generation the collector never walks;
objects made during training are still collected as before, and the frozen ones become
collectable again once training ends (``thaw_long_lived_objects``). Garbage is collected once
before the freeze, so nothing already unreachable is kept for the run.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_frozen_here = False  # whether the objects now frozen were frozen by ``long_lived_objects_frozen``


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Within, the objects that existed on entry are out of the collector's walks (``gc.freeze``).

    Left alone where the collector is disabled or something already froze objects (a server
    that froze its own before forking): unfreezing afterwards would undo that freeze too."""
    global _frozen_here
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    _frozen_here = True
    try:
        yield
    finally:
        thaw_long_lived_objects()


def thaw_long_lived_objects() -> None:
    """End ``long_lived_objects_frozen``'s freeze early (a no-op outside it): teardown that needs
    a collection to reach objects made before training (the trainer's own) calls this first."""
    global _frozen_here
    if _frozen_here:
        gc.unfreeze()
        _frozen_here = False
