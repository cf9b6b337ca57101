"""Immortal template objects for --preload: what keeps a forked model's Python objects
shared with its template while it reads them.

Reading an object writes its reference count, so a child forked from a template copies
every page of the template's heap that it reads (copy-on-write), and a model whose data
is Python objects (dicts, tuples, strings) is soon whole again in every child. CPython
3.12 and later have immortal objects (PEP 683): one whose reference count has its low
32 bits all set (`_Py_IMMORTAL_REFCNT`, 0xFFFFFFFF on a 64-bit build of 3.12 and 3.13,
Include/object.h) is never incremented nor decremented, so its page is never written
by a read. After the model's load, the template marks every object reachable from its
heap so (`Walk`), freezes the collector, and the children forked from it then share
those pages for good.

The launcher loads this file by its path (`_launcher.py`, in the model's own
interpreter, which may not have modelpool installed): it imports only the standard
library, and adds nothing to the model's sys.modules. Like the launcher, it must
parse on any Python 3 the launcher runs on (3.9 and later).

What is made immortal, and what is not:
- every object reachable from sys.modules (every module, and so every class, function
  and global of each) and from the locals of the model's frames (a model that keeps its
  data in main()'s locals), through each object's referents (`gc.get_referents`;
  a dict's keys and values, a sequence's items, a code object's constants): not
  through an object that is immortal already (the interpreter's own), nor the ones the
  launcher names (its template, which it frees later);
- never a frame: a frame that ends looks at its reference count to decide whether to
  hand its locals over to its frame object.

The walk uses no memory in proportion to the heap: an object's own reference count is
its "seen" mark (an immortal one is skipped), and its stack holds one iterator per
level of nesting (over a short tuple or list's containers, a list of them). It is the
pure-Python loop that costs: a string or a number is marked where it is met, and so are
the items of a short tuple or list, without an iterator of their own (about 220 ns an
object on 3.12 on a quiet machine here, 2.2 s for 10 million; half of what one iterator
per container took; a check by sys.getrefcount, or marking through C-level iterators,
gained nothing measurable: a write through ctypes or a memoryview costs about 100 ns
either way). It runs in slices
(`Walk.step`), so the template answers fork requests between two slices.

What a model gives up (docs/operating.md says it to users): an object of the template
is never freed in a child (nor in the template), so its finalizer (`__del__`, a file's
close on release) and the callbacks of weak references to it never run there, and code
that checks reference counts (numpy's in-place `resize`, `sys.getrefcount`) sees a
huge one.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import time
import types

TYPE_CHECKING = False  # not typing's: no import the model has not made
if TYPE_CHECKING:
    from collections.abc import Iterator

IMMORTAL_REFCNT = 0xFFFFFFFF  # _Py_IMMORTAL_REFCNT of a 64-bit CPython 3.12 and 3.13
IMMORTAL_BIT = 1 << 31  # _Py_IsImmortal: the low 32 bits, read as an int32, are negative
CHECK_EVERY = 4096  # objects marked between two looks at the clock
# Objects that refer to no other object: marked, never looked into.
ATOMS = frozenset({str, int, float, complex, bytes, bool, type(None)})
SEQUENCES = frozenset({tuple, list, set, frozenset})
FLAT = frozenset({tuple, list})  # a short one's items are looked at where it is met
FLAT_MAX = 64  # items of a tuple or list looked at inline (a longer one is pushed)


def problem() -> str | None:
    """Why this interpreter's objects cannot be made immortal safely, or None."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    name = sys.implementation.name
    if name != "cpython":
        return f"it runs on {name}, not CPython"
    if sys.version_info < (3, 12):
        return f"Python {version} has no immortal objects (CPython 3.12 and later have)"
    if sys.version_info >= (3, 14):
        return (
            f"Python {version} marks immortal objects in a header that this version of "
            "modelpool does not know yet (it knows 3.12 and 3.13)"
        )
    if "t" in getattr(sys, "abiflags", ""):
        return f"a free-threaded build of Python {version} counts references in two fields"
    if hasattr(sys, "gettotalrefcount"):
        return f"a debug build of Python {version} keeps a total of references"
    if sys.maxsize < 2**32:
        return "a 32-bit build of Python marks immortal objects otherwise"
    return _self_test()


def _words() -> ctypes.Array[ctypes.c_ssize_t]:
    """All of memory as an array of machine words: an object's reference count is the
    word at its address, `words[id(obj) >> 3]` (ob_refcnt, the first field of every
    object of a release build). One array, read and written by index, is several times
    faster than a ctypes object made for each of millions of objects."""
    return (ctypes.c_ssize_t * (sys.maxsize // ctypes.sizeof(ctypes.c_ssize_t))).from_address(0)


def _self_test() -> str | None:
    """Check on a fresh object that the reference count is where it is expected, and
    that the interpreter leaves one marked immortal alone (it stays immortal, leaked)."""
    words = _words()
    probe = [None]
    index = id(probe) >> 3
    if words[index] != sys.getrefcount(probe) - 1 or words[id(None) >> 3] != IMMORTAL_REFCNT:
        return "its objects' reference counts are not where CPython keeps them"
    words[index] = IMMORTAL_REFCNT
    copies = [probe, probe, probe]
    del copies
    if words[index] != IMMORTAL_REFCNT or sys.getrefcount(probe) != IMMORTAL_REFCNT:
        return "it did not leave an object marked immortal alone"
    return None


def model_frames(own: set[str]) -> list[types.FrameType]:
    """The frames of the running stack but those of files in `own` (the launcher's):
    where a model keeps what it loaded in its functions' locals."""
    frames = []
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename not in own:
            frames.append(frame)
        frame = frame.f_back
    return frames


class Walk:
    """Mark every object reachable from sys.modules and the locals of `frames` immortal,
    a slice at a time (`step`); `skip`: ids of objects left mortal, and not looked into.

    Call `problem()` first: on an interpreter it refuses, this writes over memory.
    """

    def __init__(self, frames: list[types.FrameType], skip: set[int]) -> None:
        self.objects = 0  # marked so far
        self._words = _words()
        self._skip = skip
        roots: list[object] = [sys.modules]
        for frame in frames:  # its locals, not itself (see the module's docstring)
            roots.append(frame.f_globals)
            roots.extend(frame.f_locals.values())
        self._stack: list[Iterator[object]] = [iter(roots)]

    def step(self, seconds: float) -> bool:
        """Mark objects for about `seconds`; True once every one is marked.

        The common objects are done inline: an atom (a string, a number) is marked where
        it is met, and so are the atoms in a tuple or a list, without an iterator of
        their own on the stack; only containers are looked into through the stack.
        """
        words, skip, stack = self._words, self._skip, self._stack
        deadline = time.monotonic() + seconds
        marked = passed = 0
        budget = CHECK_EVERY
        atoms, flat, frame = ATOMS, FLAT, types.FrameType
        while stack:
            for obj in stack[-1]:
                index = id(obj) >> 3
                if words[index] & IMMORTAL_BIT:  # seen, or the interpreter's own
                    passed += 1
                    if passed >= CHECK_EVERY:  # a long run of them: a look at the clock
                        passed, budget = 0, marked
                        break
                    continue
                kind = type(obj)
                if kind in atoms:
                    words[index] = IMMORTAL_REFCNT
                    marked += 1
                    if marked >= budget:
                        break
                    continue
                if kind is frame or id(obj) in skip:
                    continue
                words[index] = IMMORTAL_REFCNT
                marked += 1
                if kind in flat and len(obj) <= FLAT_MAX:  # type: ignore[arg-type]
                    # its items here: the atoms marked, the containers pushed
                    inner = None
                    for item in obj:  # type: ignore[attr-defined]
                        index = id(item) >> 3
                        if words[index] & IMMORTAL_BIT:
                            continue
                        if type(item) in atoms:
                            words[index] = IMMORTAL_REFCNT
                            marked += 1
                        elif inner is None:
                            inner = [item]
                        else:
                            inner.append(item)
                    if inner is None:
                        if marked >= budget:
                            break
                        continue
                    stack.append(iter(inner))
                    break
                _push_referents(stack, obj, kind)
                break
            else:
                stack.pop()
                continue
            if marked >= budget:
                budget = marked + CHECK_EVERY
                if time.monotonic() >= deadline:
                    self.objects += marked
                    return not stack
        self.objects += marked
        gc.freeze()  # what the walk itself made: in no generation a collection looks at
        return True


def _push_referents(stack: list[Iterator[object]], obj: object, kind: type) -> None:
    """Push iterators over what `obj` refers to, with no copy of a dict, sequence or set.

    A dict's keys are not among its referents when they are all strings (they cannot
    form a cycle), so a dict is iterated, as a dict: a subclass's own methods are not
    called. A code object (no referents of its own) holds its constants.
    """
    if kind is dict or kind in SEQUENCES:
        if kind is dict:
            stack.append(iter(dict.values(obj)))  # type: ignore[arg-type]
            stack.append(iter(dict.keys(obj)))  # type: ignore[arg-type]
        else:
            stack.append(iter(obj))  # type: ignore[call-overload]
        return
    if kind is types.CodeType:
        stack.append(iter(obj.co_consts))  # type: ignore[attr-defined]
        return
    stack.append(iter(gc.get_referents(obj)))
    if isinstance(obj, dict):  # a subclass: its keys too
        stack.append(iter(dict.keys(obj)))
