"""Triton's interpreter, without its per-call re-patching and on a roomy frame stack (test-only, like ``_interpreter_atomics``).

The interpreter swaps ``triton.language``'s builtins for interpreted ones when a kernel launches
(``GridExecutor.__call__`` -> ``_patch_lang``, restored when the launch ends), and again on every call
of a ``@triton.jit`` helper from inside the kernel (``InterpretedFunction.__call__``), each time
walking three modules with ``inspect.getmembers``. Inside a launch that second patching finds the
namespace already patched whenever the helper sees no module the launch has not patched (the same
``triton.language`` and ``triton.language.core`` objects) and changes nothing, but it cost about a third of the kernel tests' time once the
kernels were written as small helpers. This skips it in exactly that case; the launch's own patching, its restoring, and every
helper that sees another module (Triton's own standard library sees ``triton.language.core``) are
untouched.

Each launch runs in a fresh, roomy stretch of CPython's frame stack. CPython 3.11 keeps Python frames
in 16 KiB chunks, maps a new chunk when a call does not fit in the current one, and unmaps it when
that call returns. A kernel's interpreted operations call a dozen frames deep thousands of times per
launch; when the launch begins near the end of a chunk, every one of those calls maps and unmaps a
chunk (about 450,000 ``mmap``/``munmap`` pairs in 36 volume cases, a fifth of the kernel tests' time
as system time). ``_roomy`` calls the launch from a frame too large for what is left of any chunk,
so CPython gives it a 128 KiB chunk of its own with about 56 KiB to spare, and the launch's calls
stay inside it.

It also remembers ``_get_np_dtype``'s answers: the interpreter asks it the numpy dtype of a Triton
type at nearly every operation, and it builds a dictionary of twenty entries each time it is asked.

And it remembers what the constructors of ``tl.block_type`` and ``tl.tensor`` derive from a block
shape (the shape as a ``tl.tuple`` and its type, the element count, the printed name): every
interpreted operation makes a new block type and tensor, and building those from scratch was a
fifth of a kernel test's time. The objects come out with the same attributes (checked at install).

And it answers four questions of Triton's front end without building anything, whenever the operands
are what a kernel's arithmetic nearly always passes (checked against the originals at install): is
a shape (a ``tl.tuple``) equal to a list of ints (``tl.tuple.__eq__`` normalises its operand into a new
``tl.tuple`` with a new type to compare two short lists), do two blocks of the same shape need
broadcasting (no), is a dtype equal to itself (yes), and what is a ``constexpr`` or a plain value
unwrapped (its value, itself). Together they were a quarter of a kernel test's time.

Last, it skips the integer-overflow check whose finding the interpreter never reports. Triton's front
end redoes every int32 add, sub and mul in int64 and compares it with int32's range (eight more
interpreted operations each: a third of what was left of a kernel test's time), then hands the
comparison to ``device_assert``, which returns without asserting unless the options have ``debug`` on,
and the interpreter's options never do. The check runs as before if they ever do.
"""


def _make_roomy(slots=9000):
    """A function ``roomy(fn, args, kwargs)`` that calls ``fn`` from a frame of ``slots`` local
    variables (8 bytes each: 72 KiB, more than a 16 KiB chunk can have left)."""
    names = [f"_{i}" for i in range(slots)]
    src = "def roomy(fn, args, kwargs):\n    " + " = ".join(names) + " = None\n    return fn(*args, **kwargs)\n"
    ns = {}
    exec(compile(src, "<roomy>", "exec"), ns)
    return ns["roomy"]


_roomy = _make_roomy()


class _NoScope:
    def restore(self):
        pass


def install():
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_stn_triton_fast_patch", False):
        return
    original = interpreter._patch_lang
    state = {"launches": 0, "pending": False, "patched": set()}
    seen = {}  # function -> the triton.language modules its globals see (tl, tl.core)

    def langs(fn):
        key = id(fn.__globals__)
        if key not in seen:
            seen[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[key]

    def patch_lang(fn):
        if state["pending"] or not state["launches"]:  # a launch's own patching (or none in progress)
            state["pending"] = False
            state["patched"] = set(langs(fn))
            return original(fn)
        if langs(fn) <= state["patched"]:  # a helper that sees only modules this launch patched
            return _NoScope()
        state["patched"] |= langs(fn)
        return original(fn)

    run = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        state["launches"] += 1
        state["pending"] = True
        try:
            return _roomy(run, (self, *args), kwargs)
        finally:
            state["launches"] -= 1
            state["pending"] = False

    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch

    np_dtype = interpreter._get_np_dtype
    known = {}

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.block_type):
            tt_dtype = tt_dtype.element_ty  # a block's numpy dtype is its element's
        if isinstance(tt_dtype, tl.pointer_type):  # (unhashable) any pointer is a uint64
            return np_dtype(tt_dtype)
        try:
            return known[tt_dtype]
        except KeyError:
            known[tt_dtype] = found = np_dtype(tt_dtype)
            return found

    interpreter._get_np_dtype = get_np_dtype
    _remember_shapes(tl.core)
    _answer_quickly(tl.core, interpreter.TritonSemantic)
    _skip_the_unreported_overflow_check(interpreter.TritonSemantic)
    interpreter._stn_triton_fast_patch = True


def _plain_ints(values, constexpr):
    """A shape's values (ints or ``constexpr`` ints) as a list of ints, or None if any is something else."""
    out = []
    for v in values:
        if type(v) is constexpr:
            v = v.value
        if type(v) is not int:
            return None
        out.append(v)
    return out


def _remember_shapes(core):
    """``block_type.__init__`` and ``tensor.__init__`` with what they derive from a shape remembered
    per shape; anything but a non-empty list or ``tl.tuple`` of ints goes to the originals."""
    import builtins

    constexpr, ttuple = core.constexpr, core.tuple
    new = object.__new__

    def shape_tuple(values, shape_type):  # tl.tuple(values, shape_type), without re-listing the values
        t = new(ttuple)
        t.values, t.type = values, shape_type
        return t

    block_init, tensor_init = core.block_type.__init__, core.tensor.__init__
    blocks, tensors = {}, {}

    def ints(shape):  # a non-empty list or tl.tuple of ints as a tuple (the memory's key), else None
        if type(shape) is not list and type(shape) is not ttuple:
            return None
        out = _plain_ints(shape, constexpr)
        return builtins.tuple(out) or None if out is not None else None

    def new_block_type(self, element_ty, shape):
        key = ints(shape)
        known = blocks.get(key) if key else None
        if known is None:
            block_init(self, element_ty, shape)
            if key:
                blocks[key] = (self.shape.type, self.numel, str(self.shape))
            return
        shape_type, numel, text = known
        self.element_ty = element_ty
        self.shape = shape_tuple(list(key), shape_type)
        self.numel = numel
        self.name = f"<{text}, {element_ty}>"

    def new_tensor(self, handle, type):
        if not type.is_block():
            return tensor_init(self, handle, type)
        key = builtins.tuple(type.shape.values)
        known = tensors.get(key)
        if known is None:
            tensor_init(self, handle, type)
            tensors[key] = (self.numel, self.shape.values, self.shape.type)
            return
        numel, dims, shape_type = known
        self.handle = handle
        self.numel = numel
        self.type = type
        self.dtype = type.scalar
        self.shape = shape_tuple(list(dims), shape_type)

    core.block_type.__init__ = new_block_type
    core.tensor.__init__ = new_tensor
    # the same attributes as the originals give
    for _ in range(2):  # the first call fills the memory, the second reads it
        a = core.block_type(core.float32, [4, core.constexpr(8)])
        t = core.tensor(None, a)
    b = core.block_type.__new__(core.block_type)
    block_init(b, core.float32, [4, 8])
    u = core.tensor.__new__(core.tensor)
    tensor_init(u, None, b)
    assert (a.name, a.numel, a.shape.values, str(a.shape.type)) == (b.name, b.numel, b.shape.values, str(b.shape.type))
    assert sorted(vars(a)) == sorted(vars(b)) and sorted(vars(t)) == sorted(vars(u)), (vars(a), vars(t))
    assert [c.value for c in t.shape] == [c.value for c in u.shape] and t.numel.value == u.numel.value
    assert str(t.shape.type) == str(u.shape.type) and t.dtype == u.dtype


def _answer_quickly(core, semantic):
    """Fast paths for ``tl.tuple.__eq__``, ``TritonSemantic.broadcast_impl_value``, ``dtype.__eq__`` and
    ``_unwrap_if_constexpr``; anything but the common operands goes to the originals."""
    import builtins

    constexpr, ttuple, block_type = core.constexpr, core.tuple, core.block_type

    def ints(values):
        return _plain_ints(values, constexpr)

    tuple_eq = ttuple.__eq__

    def fast_tuple_eq(self, other):
        kind = type(other)
        theirs = other.values if kind is ttuple else other if kind is list or kind is builtins.tuple else None
        if theirs is not None:
            a, b = ints(self.values), ints(theirs)
            if a is not None and b is not None:
                return constexpr(a == b)
        return tuple_eq(self, other)

    broadcast = semantic.broadcast_impl_value

    def fast_broadcast(self, lhs, rhs):
        lt, rt = lhs.type, rhs.type
        if type(lt) is block_type and type(rt) is block_type:
            a = ints(lt.shape.values)
            if a is not None and a == ints(rt.shape.values):
                return lhs, rhs  # the same shape: nothing to broadcast
        return broadcast(self, lhs, rhs)

    dtype_eq = core.dtype.__eq__

    def fast_dtype_eq(self, other):
        return True if other is self else dtype_eq(self, other)

    unwrap = core._unwrap_if_constexpr
    plain = set()  # types the original returns unchanged

    def fast_unwrap(o):
        kind = type(o)
        if kind is constexpr:
            return o.value
        if kind in plain:
            return o
        if not issubclass(kind, (list, builtins.tuple, ttuple, constexpr)):
            plain.add(kind)
            return o
        return unwrap(o)

    ttuple.__eq__ = fast_tuple_eq
    semantic.broadcast_impl_value = fast_broadcast
    core.dtype.__eq__ = fast_dtype_eq
    core._unwrap_if_constexpr = fast_unwrap
    # the same answers as the originals give
    shapes = [[4, 8], [4, core.constexpr(8)], (4, 8), [8, 4], [4], [], [4, 8.0], ttuple([4, 8])]
    for s in shapes:
        for t in shapes:
            assert bool(fast_tuple_eq(ttuple([4, 8]), t)) == bool(tuple_eq(ttuple([4, 8]), t)), (s, t)
    for a in (core.float32, core.int32, core.block_type(core.float32, [4])):
        for b in (core.float32, core.int32, core.constexpr(core.float32), None):
            assert fast_dtype_eq(core.float32, b) == dtype_eq(core.float32, b)
            assert (a == b) == (type(a).__eq__(a, b))
    for o in (core.constexpr(3), 3, 2.5, None, core.float32, [core.constexpr(1), 2], (core.constexpr(1), 2),
              ttuple([core.constexpr(1), 2])):
        got, want = fast_unwrap(o), unwrap(o)
        assert type(got) is type(want) and (got.values == want.values if type(got) is ttuple else got == want), o


def _skip_the_unreported_overflow_check(semantic):
    """``binary_op_sanitize_overflow_impl`` returns at once where its ``device_assert`` would: without
    ``debug`` in the builder's options."""
    import inspect

    original = semantic.binary_op_sanitize_overflow_impl

    def sanitize(self, lhs, rhs, binary_op):
        if not self.builder.options.debug:
            return None  # device_assert would return here without asserting: nothing to compute
        return original(self, lhs, rhs, binary_op)

    semantic.binary_op_sanitize_overflow_impl = sanitize
    assert "if not self.builder.options.debug:\n            return" in inspect.getsource(semantic.device_assert)
