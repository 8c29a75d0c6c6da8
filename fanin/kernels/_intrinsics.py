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
    sits in a fully unrolled loop. The function that uses it gets 512-bit vectors where the CPU has
    them (``prefer_512_bit_vectors``): such accumulators are the register-blocked kernels'."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value

    def codegen(context, builder, signature, args):
        prefer_512_bit_vectors(builder.function)
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype),
                                   size=context.get_constant(types.intp, n))

    return types.CPointer(dtype.dtype)(size, dtype), codegen


def prefer_512_bit_vectors(function):
    """Mark an LLVM function (``builder.function`` in an intrinsic's codegen) to vectorise with 512-bit
    registers on AVX-512 CPUs. LLVM's tuning for Intel server parts (Sapphire Rapids and later) prefers 256-bit
    vectors, to spare the clock the older ones lost on wide instructions, so Numba's loops there came out in ymm
    registers: half the width of the same code on AMD Zen 4/5, whose tuning prefers 512. Measured on the 2-core
    Intel Xeon (AVX-512 FP16), SRigL-90 % 784-1024-1024-10 MLP, float panels: batch 32 278 -> 204 us serial,
    batch 256 1.12 -> 0.85 ms on 2 threads. Only the vector width changes: no reassociation, the same
    results bit for bit. Without AVX-512 the attributes are ignored."""
    attrs = function.attributes
    # llvmlite's FunctionAttributes accepts enum attributes only; a string attribute is written as it is
    set.add(attrs, '"prefer-vector-width"="512"')
    set.add(attrs, '"min-legal-vector-width"="512"')


@intrinsic
def wide_vectors(typingctx):
    """``wide_vectors()`` at the top of a kernel: its loops vectorise with 512-bit registers on AVX-512 CPUs
    (``prefer_512_bit_vectors``; for element-wise loops with no ``stack_buffer``). Generates no code."""

    def codegen(context, builder, signature, args):
        prefer_512_bit_vectors(builder.function)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def round_int32(typingctx, v):
    """The float64 ``v`` rounded to the nearest integer, ties to even (the rounding mode Python and NumPy run
    under), as int32: ``np.int32(np.rint(v))`` for |v| < 2**31, in one conversion (``llvm.lrint``: vcvtpd2qq in
    a vectorised loop, where rint then a truncating conversion takes two, each two uops). For NaN or a value out of
    range the result is unspecified (LLVM's lrint), not undefined behaviour."""
    if not isinstance(v, types.Float) or v.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        i64 = llvmir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, llvmir.FunctionType(i64, [llvmir.DoubleType()]),
                                            "llvm.lrint.i64.f64")
        return builder.trunc(builder.call(fn, [args[0]]), llvmir.IntType(32))

    return types.int32(v), codegen
