/* The broker's copy of a large parcel with streaming (non-temporal) stores.
 *
 * A parcel larger than the caches it passes through (see STREAM_MIN in
 * one_copy.py) is written to memory without first reading each destination
 * line in (no read-for-ownership) and without evicting the sender's ring and
 * payload from the cache: a third less memory traffic for the one copy. glibc's
 * memmove does the same for a single call above its non-temporal threshold, but
 * the broker copies such a parcel in 512 KiB parts, each below it; and glibc's
 * streaming loop runs at a fifth of its speed here when source and destination
 * differ in their offsets within a page, as a parcel's head makes them.
 *
 * copy(destination, source, size): addresses as ints, size in bytes; the ranges
 * must not overlap. The GIL is released for the copy. On machines without SSE2
 * (not x86-64) it is a plain memmove; STREAMING says which.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_STREAMING 1

/* Lines of 64 bytes: a destination line is written whole by four 16-byte stores,
 * which the CPU merges into one write to memory. */
static void
stream_copy(char *dst, const char *src, size_t n)
{
    size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
    if (n < head + 256) {
        memmove(dst, src, n);
        return;
    }
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    /* Streaming stores are weakly ordered: make them visible before any later
     * store (the progress word, the message that hands the parcel on). */
    _mm_sfence();
    memcpy(dst + body, src + body, n - body);
}
#else
#define HAVE_STREAMING 0
static void
stream_copy(char *dst, const char *src, size_t n)
{
    memmove(dst, src, n);
}
#endif

static PyObject *
copy(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(destination, source, size) takes 3 ints");
        return NULL;
    }
    void *dst = PyLong_AsVoidPtr(args[0]);
    if (dst == NULL && PyErr_Occurred())
        return NULL;
    void *src = PyLong_AsVoidPtr(args[1]);
    if (src == NULL && PyErr_Occurred())
        return NULL;
    size_t n = PyLong_AsSize_t(args[2]);
    if (n == (size_t)-1 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    stream_copy((char *)dst, (const char *)src, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL,
     "copy(destination: int, source: int, size: int) -> None\n\n"
     "Copy size bytes between two addresses that do not overlap, with streaming\n"
     "stores where the CPU has them (see STREAMING). Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "pybinder.broker._stream",
    "The broker's copy of large parcels with streaming stores.", -1, methods,
};

PyMODINIT_FUNC
PyInit__stream(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddIntConstant(module, "STREAMING", HAVE_STREAMING) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
