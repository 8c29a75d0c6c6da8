"""Low-level Numba intrinsics shared by the CPU kernels."""
from llvmlite import ir as llvmir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def load_unchecked(typingctx, arr, i):
    """arr[i] for a 1-D unit-stride array and an index known to be in range: no wraparound and no
    bounds check; a narrow index is sign- or zero-extended from its own width, so LLVM can
    vectorise a loop of these loads into 32-bit-index gathers (vgatherdps)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty, ity = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        ix = args[1]
        if ity.bitwidth < 64:
            ix = builder.sext(ix, llvmir.IntType(64)) if ity.signed else builder.zext(ix, llvmir.IntType(64))
        return builder.load(builder.gep(ary.data, [ix], inbounds=True))

    return arr.dtype(arr, i), codegen


@intrinsic
def stack_buffer(typingctx, size, dtype):
    """A pointer to ``size`` (a compile-time constant, e.g. a module-level int) elements of ``dtype``
    on the stack, allocated in the entry block: wrapped with ``numba.carray`` it is a small
    accumulator array that LLVM promotes to registers when every access has a constant index or
    sits in a fully unrolled loop."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype),
                                   size=context.get_constant(types.intp, n))

    return types.CPointer(dtype.dtype)(size, dtype), codegen
